"""Find functional blocks of decoder layers from data."""
