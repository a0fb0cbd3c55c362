"""The master process and the parts it drives (see loop.py)."""
