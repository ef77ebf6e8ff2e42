"""busd.store."""
