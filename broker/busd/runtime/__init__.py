"""busd.runtime."""
