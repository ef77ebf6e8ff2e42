"""busd.routing."""
