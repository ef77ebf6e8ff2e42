"""busd.cli."""
