"""The busd benchmark against its peers (``make bench``); not collected by pytest."""
