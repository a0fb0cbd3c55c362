"""An app with no page at /: prefork falls back to static/index.html there."""


def app(environ, start_response):
    if environ["PATH_INFO"] == "/other":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"other page"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"app 404"]
