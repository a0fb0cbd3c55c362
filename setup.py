"""The compiled parts, two C modules on the per-request path (each says why in
its header): prefork.http._llhttp, our binding of the vendored llhttp, and
prefork.worker._combined, the access line's formatter. Everything else is in
pyproject.toml. The build is optional: where it fails (no C compiler), the
reader uses httptools' binding of the same llhttp and the log its Python
formatter, which are slower per request and otherwise the same (the tests run
against both)."""
from setuptools import Extension, setup

LLHTTP = "vendor/llhttp"

setup(ext_modules=[Extension(
    "prefork.http._llhttp",
    sources=["prefork/http/_llhttp.c", f"{LLHTTP}/src/api.c", f"{LLHTTP}/src/http.c",
             f"{LLHTTP}/src/llhttp.c"],
    include_dirs=[f"{LLHTTP}/include"],
    extra_compile_args=["-O2"],
    optional=True,
), Extension(
    "prefork.worker._combined",
    sources=["prefork/worker/_combined.c"],
    extra_compile_args=["-O2"],
    optional=True,
)])
