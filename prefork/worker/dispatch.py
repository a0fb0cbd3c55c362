"""What answers a request: the user's app, found by its spec, behind the
server's own handlers.

Owns: loading `module:callable` (the worker does at boot, `check` does too),
and the one dispatcher in front of the app: the status path, then static
files, then the app; `/` goes to the app first and may fall back to
static/index.html. One call per request, not one per built-in handler.
Must not: know what the handlers do inside.
"""
from __future__ import annotations

import importlib
import sys


class AppLoadError(Exception):
    pass


def load_app(spec: str, pythonpath=()):
    """'pkg.module:attr' (attr may be dotted) -> the WSGI callable."""
    for entry in reversed(pythonpath):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, _, attr_path = spec.partition(":")
    module = importlib.import_module(module_name)
    target = module
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise AppLoadError(f"cannot load app {spec}: module {module_name!r} has no "
                               f"attribute {attr_path!r}") from None
    if not callable(target):
        raise AppLoadError(f"cannot load app {spec}: {attr_path} is not callable")
    return target


def compose(app, status, static, health=None):
    """The app behind the status endpoint, the health path and static files
    (any may be None). The server's own paths are matched on the raw target
    too, so an encoded form (/%5Fstatus) that a proxy's literal deny rule
    would not catch never reaches them: it goes to the app like any path."""
    if status is None and static is None and health is None:
        return app
    own = {handler.path: handler for handler in (status, health) if handler is not None}
    prefix = static.prefix if static is not None else None

    def dispatch(environ, start_response):
        path = environ["PATH_INFO"]
        handler = own.get(path)
        if handler is not None and \
                environ["RAW_URI"].partition("?")[0] == environ["SCRIPT_NAME"] + path:
            return handler(environ, start_response)
        if prefix is not None:
            if path.startswith(prefix):
                return static.serve(environ, start_response, path[len(prefix):])
            if path == "/":
                return static.app_or_index(app, environ, start_response)
        return app(environ, start_response)
    return dispatch


class Health:
    """[status] health: 200 while this worker takes traffic, 503 once it
    drains. draining(): whether the server drains (the worker's word)."""

    def __init__(self, path, draining):
        self.path = path
        self.draining = draining

    def __call__(self, environ, start_response):
        draining = self.draining()
        start_response("503 Service Unavailable" if draining else "200 OK",
                       [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [b"draining\n" if draining else b"ok\n"]


def read_only(start_response):
    """405 for the server's own handlers, which answer GET and HEAD only."""
    start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                              ("Content-Type", "text/plain")])
    return [b"method not allowed\n"]
