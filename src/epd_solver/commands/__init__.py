"""Sub-commands of the ``epd`` command line; each module defines ``add_parser(subparsers)``."""
