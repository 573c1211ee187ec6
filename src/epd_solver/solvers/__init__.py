"""Built-in training-free samplers (importing this package registers them)."""
