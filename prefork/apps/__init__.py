"""Built-in WSGI apps: the status endpoint and the demo site."""
