"""One app with a route per behaviour the tests need."""
import os
import sys
import time



def app(environ, start_response):
    path = environ["PATH_INFO"]
    handler = ROUTES.get(path)
    if handler is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    return handler(environ, start_response)


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def pid(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


def echo(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("X-Method", environ["REQUEST_METHOD"]),
                              ("X-Path", environ["PATH_INFO"]),
                              ("X-Query", environ["QUERY_STRING"])])
    return [body]


def environ_dump(environ, start_response):
    keys = sorted(k for k, v in environ.items() if isinstance(v, str))
    body = "\n".join(f"{k}={environ[k]}" for k in keys).encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def slow(environ, start_response):
    seconds = float(environ["QUERY_STRING"] or "1")
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow done"]


def hold(environ, start_response):
    """/hold?PATH: runs until the file PATH exists (at most 30 s): a request
    that stays busy exactly as long as its test needs."""
    deadline = time.monotonic() + 30
    while not os.path.exists(environ["QUERY_STRING"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"released"]


def stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(5):
        yield b"chunk%d\n" % i


def big(environ, start_response):
    size = int(environ["QUERY_STRING"] or "1000000")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def gen():
        block = b"x" * 65536
        left = size
        while left > 0:
            yield block[:left]
            left -= len(block)
    return gen()


def crash(environ, start_response):
    raise RuntimeError("boom from the app")


def crash_midway(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first part"
    raise RuntimeError("boom after the headers")


def bad_header(environ, start_response):
    start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: injected=1")])
    return [b"never"]


def no_content(environ, start_response):
    start_response("204 No Content", [("Content-Length", "0")])
    return [b""]


def not_modified(environ, start_response):
    start_response("304 Not Modified", [("ETag", '"x"')])
    return [b"must not be sent"]


def legacy_write(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"directly ")
    return [b"and returned"]


def exc_info_retry(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("changed my mind")
    except ValueError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"retry later"]


def app_close(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return [b"bye"]


def file(environ, start_response):
    path = environ["QUERY_STRING"]
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](open(path, "rb"))


CLOSED_MARKER = "/tmp/prefork-test-closed"


class ClosingBody:
    def __init__(self, marker):
        self.marker = marker

    def __iter__(self):
        yield b"body"
        raise RuntimeError("fails while iterating")

    def close(self):
        with open(self.marker, "w") as fh:
            fh.write("closed")


def close_called(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ClosingBody(environ["QUERY_STRING"])


def errors_stream(environ, start_response):
    environ["wsgi.errors"].write("a line written to wsgi.errors\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"logged"]


def returns_str(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["a str, not bytes"]


def yields_str(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield "a str, not bytes"


def fork(environ, start_response):
    """Forks a child that exits at once and never waits for it."""
    if os.fork() == 0:
        os._exit(0)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"forked"]


def returns_none(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return None


LAYOUT_CHECK = """<!doctype html><meta charset="utf-8"><body>
<iframe id="page" src="/_status" style="width: %dpx; height: 1600px; border: 0"></iframe>
<pre id="result">waiting</pre>
<script>
// Same origin as the dashboard, so its boxes can be measured once its script
// has drawn it: no two boxes that are not nested may overlap, and nothing but
// the scrolling workers table may be wider than the page.
function name(el) {
  return el.tagName + "." + (el.className || el.id) + " (" + el.textContent.slice(0, 30) + ")";
}
function check() {
  var doc = document.getElementById("page").contentDocument;
  if (!doc || !doc.body || !doc.body.getAttribute("data-updated")) return setTimeout(check, 50);
  var boxes = Array.prototype.slice.call(doc.querySelectorAll(
      "body > *:not(script):not(noscript), figure, figcaption, svg, .bar, td, th"));
  var found = [], width = doc.documentElement.clientWidth;
  boxes.forEach(function (a, i) {
    var ra = a.getBoundingClientRect();
    if (!ra.width || !ra.height) return;
    if (ra.right > width + 1 && !a.closest(".wide"))
      found.push("too wide: " + name(a) + " " + ra.right);
    boxes.slice(i + 1).forEach(function (b) {
      if (a.contains(b) || b.contains(a)) return;
      var rb = b.getBoundingClientRect();
      var x = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
      var y = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
      if (x > 1 && y > 1) found.push(name(a) + " over " + name(b));
    });
  });
  document.getElementById("result").textContent = found.length ? found.join("\\n") : "OK";
}
document.getElementById("page").onload = check;
</script>"""


def layout_check(environ, start_response):
    """/layout-check?WIDTH: the dashboard in a frame WIDTH px wide, measured (the
    browser test reads #result)."""
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [(LAYOUT_CHECK % int(environ["QUERY_STRING"] or "1280")).encode()]


ROUTES = {
    "/layout-check": layout_check,
    "/": hello, "/hello": hello, "/returns-none": returns_none, "/fork": fork, "/pid": pid, "/echo": echo,
    "/environ": environ_dump, "/slow": slow, "/hold": hold,
    "/stream": stream, "/big": big, "/crash": crash, "/crash-midway": crash_midway,
    "/bad-header": bad_header, "/204": no_content, "/304": not_modified,
    "/write": legacy_write, "/exc-info": exc_info_retry, "/app-close": app_close,
    "/file": file, "/close-called": close_called, "/errors": errors_stream,
    "/returns-str": returns_str, "/yields-str": yields_str,
}
