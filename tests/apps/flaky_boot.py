"""Boots normally, unless a file named fail-boot exists in the server's base
directory (its working directory): then every import fails, as after a bad deploy."""
import os

if os.path.exists("fail-boot"):
    raise RuntimeError("deploy is broken: fail-boot marker present")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
