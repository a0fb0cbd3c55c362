"""An app that leaks 8 MiB per request: max_rss must recycle its worker."""
import os

_hoard = []


def app(environ, start_response):
    _hoard.append(bytearray(8 * 1024 * 1024))   # touched pages: real RSS
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
