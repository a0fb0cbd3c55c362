"""An app that starts long-lived children of its own, as apps do (a process
pool, a helper daemon): what must not outlive its worker."""
import multiprocessing
import os
import subprocess

_kept = []


def app(environ, start_response):
    if environ["PATH_INFO"] == "/manager":
        manager = multiprocessing.Manager()   # forked: it inherits the worker's descriptors
        _kept.append(manager)
        child = manager._process.pid
    elif environ["PATH_INFO"] == "/sleeper":
        child = subprocess.Popen(["sleep", "600"]).pid
    else:
        child = 0
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()} {child}".encode()]
