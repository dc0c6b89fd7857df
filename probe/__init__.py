"""Find functional blocks of decoder layers from data."""

__version__ = "0.1.0"
