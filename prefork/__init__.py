"""prefork: a preforking HTTP/1.1 server for WSGI applications."""
import importlib.util
import os

__version__ = "0.1.0"

# Shipped inside the package, so an installed prefork finds them too (the
# checkout's top-level templates/ and static/ point here).
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTIN_TEMPLATES = os.path.join(ASSETS, "templates")
BUILTIN_STATIC = os.path.join(ASSETS, "static")


def title(role: str, name: str = "") -> str:
    """A process title: "prefork: worker 3 [shop]" ([server] name tells
    two instances apart in ps)."""
    return f"prefork: {role} [{name}]" if name else f"prefork: {role}"


# Built by setup.py where there is a C compiler; elsewhere the same work is
# done in Python (httptools' binding of llhttp, logship.combined_line).
C_MODULES = ("prefork.http._llhttp", "prefork.worker._combined")


def missing_c_modules() -> list:
    """The C modules not built here: prefork is correct without them, and
    about a third slower per small request, which an operator should hear."""
    return [name for name in C_MODULES if importlib.util.find_spec(name) is None]


def missing_c_note(missing: list) -> str:
    return (f"not built here: {', '.join(missing)} (was there a C compiler when prefork was "
            f"installed?); the same work runs in Python, about a third slower per small request")
