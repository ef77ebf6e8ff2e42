"""busd.rpc."""
