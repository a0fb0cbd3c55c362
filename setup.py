"""The compiled parts, three C modules on the per-request path (each says why in
its header): prefork.http._llhttp, our binding of the vendored llhttp,
prefork.http._nghttp2, our binding of the vendored libnghttp2 (HTTP/2), and
prefork.worker._combined, the access line's formatter. Everything else is in
pyproject.toml. The build is optional: where it fails (no C compiler), the
reader uses httptools' binding of the same llhttp and the log its Python
formatter, which are slower per request and otherwise the same (the tests run
against both)."""
from setuptools import Extension, setup

import glob

LLHTTP = "vendor/llhttp"
NGHTTP2 = "vendor/nghttp2/lib"

setup(ext_modules=[Extension(
    "prefork.http._llhttp",
    sources=["prefork/http/_llhttp.c", f"{LLHTTP}/src/api.c", f"{LLHTTP}/src/http.c",
             f"{LLHTTP}/src/llhttp.c"],
    include_dirs=[f"{LLHTTP}/include"],
    extra_compile_args=["-O2"],
    optional=True,
), Extension(
    "prefork.http._nghttp2",
    sources=["prefork/http/_nghttp2.c"] + sorted(glob.glob(f"{NGHTTP2}/*.c")),
    include_dirs=[f"{NGHTTP2}/includes", NGHTTP2],
    # What nghttp2's configure would find on Linux (it is built without it).
    define_macros=[("NGHTTP2_STATICLIB", None), ("BUILDING_NGHTTP2", None),
                   ("HAVE_ARPA_INET_H", "1"), ("HAVE_NETINET_IN_H", "1"),
                   ("HAVE_CLOCK_GETTIME", "1"), ("HAVE_DECL_CLOCK_MONOTONIC", "1")],
    extra_compile_args=["-O2"],
    optional=True,
), Extension(
    "prefork.worker._combined",
    sources=["prefork/worker/_combined.c"],
    extra_compile_args=["-O2"],
    optional=True,
)])
