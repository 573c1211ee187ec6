"""ComfyUI node pack of epd-solver: EPD Sampler, EPD Sigmas and EPD Distill.

Install by copying or symlinking this folder into ``ComfyUI/custom_nodes/`` with ``epd_solver`` importable
in ComfyUI's Python (``pip install epd-solver``). Parameter files live in ``ComfyUI/models/epd_solver/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
