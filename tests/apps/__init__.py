"""WSGI apps the integration tests serve (imported by the real workers)."""
