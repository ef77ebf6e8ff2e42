"""busd.core."""
