"""prefork: a preforking HTTP/1.1 server for WSGI applications."""
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
