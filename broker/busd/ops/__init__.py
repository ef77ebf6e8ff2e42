"""busd.ops."""
