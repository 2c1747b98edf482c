"""lift3d: text to 3D and 4D assets by score distillation."""

__version__ = "0.1.0"
