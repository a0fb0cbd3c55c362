"""The built-in site that `make run` serves: pages from templates/, styled from
static/, linking to the live status dashboard."""
from __future__ import annotations

import os
import platform
import time

from .. import __version__
from .routing import Response, Router

router = Router()
app = router


def page(template, **context) -> Response:
    fallback = "<!doctype html><title>prefork</title><p>{title}</p>"
    return Response(router.templates.render(template, fallback, version=__version__, **context))


@router.route("/")
def home(request):
    return page("home.html", title="prefork", pid=os.getpid())


@router.route("/request", methods=("GET", "POST"))
def show_request(request):
    environ = request.environ
    headers = sorted((k[5:].replace("_", "-").title(), v) for k, v in environ.items()
                     if k.startswith("HTTP_"))
    plain = sorted((k, v) for k, v in environ.items() if isinstance(v, str))
    body = environ["wsgi.input"].read(65536).decode("utf-8", "replace")
    return page("request.html", title="Your request", headers=headers, environ=plain,
                body=body, pid=os.getpid(), method=request.method)


@router.route("/hello/<name>")
def hello(request, name):
    return page("hello.html", title=f"Hello, {name}", name=name, pid=os.getpid())


@router.route("/api/info")
def info(request):
    return {"server": "prefork", "version": __version__, "pid": os.getpid(),
            "python": platform.python_version(), "time": time.time(),
            "query": request.query}
