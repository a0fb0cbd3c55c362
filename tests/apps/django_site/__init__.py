"""A small Django project for the proxy tests: the admin, a CSRF-protected
form, and an upload that reports what arrived and from whom."""
