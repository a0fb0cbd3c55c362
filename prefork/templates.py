"""Jinja2 templates: error pages, the status dashboard, the demo site.

Owns: the one Environment (autoescape on) over the templates directory, and
the fallback rule: a missing or broken template never breaks a response; it
falls back to a plain built-in page and the reason is logged once.
jinja2 is imported on the first render, not before: it costs ~9 MiB of RSS,
which the master would otherwise pass on to every worker through fork.
"""
from __future__ import annotations

import html
import logging

from . import BUILTIN_TEMPLATES
from .http.response import REASONS

log = logging.getLogger("prefork.templates")


class Templates:
    def __init__(self, directory: str = ""):
        self.directory = directory or BUILTIN_TEMPLATES
        self._env = None
        self._warned = set()

    @property
    def env(self):
        if self._env is None:
            import jinja2
            self._env = jinja2.Environment(loader=jinja2.FileSystemLoader(self.directory),
                                           autoescape=True, auto_reload=False)
            self._env.filters["bytes"] = human_bytes
        return self._env

    def render(self, template: str, fallback: str, /, **context) -> str:
        """Render `template`; on any template problem log it once and return
        the plain `fallback` text formatted with the same context (escaped)."""
        import jinja2   # cheap after the first time (sys.modules)
        try:
            return self.env.get_template(template).render(**context)
        except jinja2.TemplateError as exc:
            if template not in self._warned:
                self._warned.add(template)
                log.error("template %s failed (%s: %s); using the built-in page",
                          template, type(exc).__name__, exc)
            safe = {k: html.escape(str(v)) for k, v in context.items()}
            return fallback.format(**safe)

    def render_error(self, status: int, detail: str = "") -> str:
        """templates/error.html for any error status: the one error page."""
        return self.render("error.html", ERROR_FALLBACK, status=status,
                           reason=REASONS.get(status, "Error"),
                           detail=detail or ERROR_DETAILS.get(status, ""))


def human_bytes(count) -> str:
    """22113831 -> "21.1 MiB" (the dashboard's units; its script does the same)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"




ERROR_DETAILS = {
    400: "The request could not be understood.",
    403: "You are not allowed to see this page.",
    404: "Nothing here.",
    405: "This method is not allowed here.",
    408: "The request did not arrive in time.",
    413: "The request body is too large.",
    414: "The request line is too long.",
    431: "The request headers are too large.",
    500: "The application failed; the error log has the details.",
    501: "This transfer coding is not supported.",
    503: "The server is not ready to answer; try again shortly.",
    505: "This HTTP version is not supported.",
    507: "The request body could not be stored.",
}
ERROR_FALLBACK = ("<!doctype html><title>{status} {reason}</title>"
                  "<h1>{status} {reason}</h1><p>{detail}</p>\n")
