"""layersplice: interpolated model sizes from a teacher and its boomerang-distilled student."""

__version__ = "0.1.0"
