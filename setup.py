"""The one compiled part: prefork.http._llhttp, our binding of the vendored
llhttp (see prefork/http/_llhttp.c for why). Everything else is in
pyproject.toml. The build is optional: where it fails (no C compiler), the
reader uses httptools' binding of the same llhttp, which is slower per request
and otherwise the same (the reader tests run against both)."""
from setuptools import Extension, setup

LLHTTP = "vendor/llhttp"

setup(ext_modules=[Extension(
    "prefork.http._llhttp",
    sources=["prefork/http/_llhttp.c", f"{LLHTTP}/src/api.c", f"{LLHTTP}/src/http.c",
             f"{LLHTTP}/src/llhttp.c"],
    include_dirs=[f"{LLHTTP}/include"],
    extra_compile_args=["-O2"],
    optional=True,
)])
