"""lensspace: the lens-aligned predictive space of tuned lenses, as a reproducible study."""

__version__ = "0.1.0"
