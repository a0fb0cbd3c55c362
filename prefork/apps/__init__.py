"""Example apps: the demo site that `make run` serves (the default app) and
the benchmark's hello world. Not part of the server: any WSGI app can take
their place."""
