"""busd.cli: the ``busd`` command line, the only package that prints or exits (entry: main)."""
