"""An app whose import takes 1.5 s and whose requests take 20 ms (the reload case)."""
import os
import time

time.sleep(float(os.environ.get("PREFORK_TEST_BOOT_SECONDS", "1.5")))


def app(environ, start_response):
    time.sleep(0.02)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
