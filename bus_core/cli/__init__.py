"""`python -m bus_core ...`: the command line, one module per command group."""
