"""A small WSGI router: @route(pattern, methods) with path parameters.

Owns: matching PATH_INFO against patterns ("/hello/<name>", "/files/<path:rest>"),
405 with Allow when the path matches but the method does not, 404 otherwise,
and turning a handler's return value (Response, str, dict) into a response.
Must not: know about any particular page.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from ..http.response import REASONS
from ..templates import Templates

_PARAM = re.compile(r"<(?:(path):)?([A-Za-z_]\w*)>")


@dataclass
class Response:
    body: bytes | str = b""
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    headers: list = field(default_factory=list)

    def __call__(self, start_response):
        body = self.body.encode() if isinstance(self.body, str) else self.body
        start_response(f"{self.status} {REASONS.get(self.status, 'Unknown')}",
                       [("Content-Type", self.content_type),
                        ("Content-Length", str(len(body)))] + self.headers)
        return [body]


def json_response(data, status=200) -> Response:
    return Response(json.dumps(data, indent=1), status, "application/json")


def error_page(templates: Templates, status, detail="") -> Response:
    return Response(templates.render_error(status, detail), status)


class Request:
    __slots__ = ("environ", "params")

    def __init__(self, environ, params):
        self.environ = environ
        self.params = params

    @property
    def method(self):
        return self.environ["REQUEST_METHOD"]

    @property
    def path(self):
        return self.environ["PATH_INFO"]

    @property
    def query(self) -> dict:
        return {k: v[-1] for k, v in parse_qs(self.environ.get("QUERY_STRING", "")).items()}


class Router:
    """A WSGI app of routes. Its pages render with `templates`: the shipped
    ones, until a prefork worker that loads it hands over its own ([site]
    templates) through use_templates()."""

    def __init__(self):
        self.routes = []   # (regex, methods, handler)
        self.templates = Templates("")

    def use_templates(self, templates: Templates) -> None:
        self.templates = templates

    def route(self, pattern: str, methods=("GET",)):
        def compile_param(match):
            kind, name = match.groups()
            return f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)"
        regex = re.compile("^" + _PARAM.sub(compile_param, pattern) + "$")
        allowed = frozenset(m.upper() for m in methods) | ({"HEAD"} if "GET" in methods else set())

        def register(handler):
            self.routes.append((regex, allowed, handler))
            return handler
        return register

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        method = environ["REQUEST_METHOD"]
        allowed_elsewhere = set()
        for regex, methods, handler in self.routes:
            match = regex.match(path)
            if match is None:
                continue
            if method not in methods:
                allowed_elsewhere |= methods
                continue
            result = handler(Request(environ, match.groupdict()), **match.groupdict())
            return as_response(result)(start_response)
        if allowed_elsewhere:
            response = error_page(self.templates, 405,
                                  f"Allowed: {', '.join(sorted(allowed_elsewhere))}")
            response.headers.append(("Allow", ", ".join(sorted(allowed_elsewhere))))
            return response(start_response)
        return error_page(self.templates, 404, f"No page at {path}.")(start_response)


def as_response(result) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, (dict, list)):
        return json_response(result)
    return Response(result)
