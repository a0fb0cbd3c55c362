"""The status endpoint: the master's published snapshot as HTML, JSON or
Prometheus text, answered by whichever worker takes the request.

Owns: access control ([status] allow), content negotiation, and the three
renderers. Per-worker live fields (state, current request, heartbeat) are
refreshed from the shared scoreboard at render time, so they are not up to one
interval stale; everything else comes from the snapshot.
Must not: ask the master anything (it works from the published snapshot).
"""
from __future__ import annotations

import json
import os
import time

from ..http.proxy import Networks
from ..scoreboard import busy_idle, shown_state
from ..stats import BUCKETS, unreported
from ..templates import Templates
from .dispatch import read_only

HTML_FALLBACK = "<!doctype html><title>prefork status</title><pre>{json}</pre>"


class StatusApp:
    def __init__(self, status_config, sink, scoreboard, templates: Templates):
        self.path = status_config.path
        self.allow = Networks(status_config.allow)
        self.interval = status_config.interval
        self.sink = sink
        self.scoreboard = scoreboard
        self.templates = templates

    def __call__(self, environ, start_response):
        if not self.allow.peer(environ["REMOTE_ADDR"]):
            return self.plain(start_response, "403 Forbidden", "status: your address is not allowed\n")
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return read_only(start_response)
        snapshot = self.sink.snapshot()
        if not snapshot:
            return self.plain(start_response, "503 Service Unavailable",
                              "status: no snapshot published yet\n")
        refresh_live(snapshot, self.scoreboard, time.monotonic(), (os.getpid(), self.path))
        kind = negotiate(environ)
        if kind == "json":
            body, ctype = json.dumps(snapshot, indent=1).encode(), "application/json"
        elif kind == "prometheus":
            body, ctype = prometheus(snapshot).encode(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            body = self.templates.render("status.html", HTML_FALLBACK, s=snapshot,
                                         refresh=max(1, int(self.interval * 2)),
                                         json=json.dumps(snapshot, indent=1),
                                         charts=charts(snapshot["history"])).encode()
            ctype = "text/html; charset=utf-8"
        start_response("200 OK", [("Content-Type", ctype), ("Cache-Control", "no-store")])
        return [body]

    @staticmethod
    def plain(start_response, status, text):
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]


CHART_W, CHART_H = 600, 120


def charts(history) -> dict:
    """SVG polyline points for the traffic charts, scaled 0 to the largest
    value shown (the page's script redraws them from the JSON the same way)."""
    def points(series, top):
        step = CHART_W / max(1, len(series) - 1)
        return " ".join(f"{i * step:.1f},{CHART_H - v / top * (CHART_H - 4):.1f}"
                        for i, v in enumerate(series))
    rps_top = max(history["rps"], default=0) or 1
    latency_top = max(history["p50"] + history["p99"], default=0) or 1
    return {"rps": points(history["rps"], rps_top), "rps_max": rps_top,
            "p50": points(history["p50"], latency_top), "p99": points(history["p99"], latency_top),
            "latency_max": latency_top}


def negotiate(environ) -> str:
    query = environ.get("QUERY_STRING", "")
    for part in query.split("&"):
        if part.startswith("format="):
            return {"json": "json", "prometheus": "prometheus", "metrics": "prometheus"}.get(
                part[7:], "html")
    accept = environ.get("HTTP_ACCEPT", "")
    if "application/json" in accept:
        return "json"
    if "text/plain" in accept and "version=0.0.4" in accept:
        return "prometheus"
    return "html"


def refresh_live(snapshot, scoreboard, now, own=None):
    """The rows' live fields from the scoreboard, and what follows from them
    (busy and idle, requests_live). own: (pid, path) of this very status
    request, which is left out of its worker's row (marked "this_page"):
    a page that counts itself shows a busy worker where none is."""
    for row in snapshot["workers"]:
        view = scoreboard.read(row["slot"])
        if view.pid != row["pid"]:
            continue   # the slot changed hands since the snapshot
        row["state"] = shown_state(row["state"] == "stopping", view)
        row.update(view.live_fields(now))
        if own is not None and row["pid"] == own[0]:
            leave_out_own(row, own[1])
    snapshot["pool"]["busy"], snapshot["pool"]["idle"] = busy_idle(
        row["state"] for row in snapshot["workers"])
    totals = snapshot["totals"]
    totals["requests_live"] = totals["requests"] + unreported(snapshot["workers"])


def leave_out_own(row, path):
    """(The slot holds the raw target, its query included.)"""
    def mine(request):
        return request["path"].partition("?")[0].endswith(path)
    if row["current"] is not None and mine(row["current"]):
        row["current"] = None
        row["this_page"] = True
    else:
        for i, r in enumerate(row["running"]):
            if mine(r):
                del row["running"][i]
                row["this_page"] = True
                if row["threads"]:
                    row["threads"] = dict(row["threads"], busy=max(0, row["threads"]["busy"] - 1))
                break
    if row.get("this_page") and row["state"] == "busy" and not row["current"] \
            and not row["running"]:
        row["state"] = "idle"


def _metric(lines, name, kind, help_text, samples):
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")


def prometheus(s) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines = []
    server, pool, totals, latency = s["server"], s["pool"], s["totals"], s["latency"]
    _metric(lines, "prefork_info", "gauge", "Server version.",
            [({"version": server["version"], "python": server["python"]}, 1)])
    _metric(lines, "prefork_uptime_seconds", "gauge", "Seconds since the master started.",
            [({}, server["uptime"])])
    _metric(lines, "prefork_generation", "gauge", "Worker generation (bumped by reload).",
            [({}, server["generation"])])
    _metric(lines, "prefork_requests_total", "counter",
            "Requests answered: by the app, or refused before it (see rejected).",
            [({}, totals["requests"])])
    _metric(lines, "prefork_responses_total", "counter", "Responses by status class.",
            [({"class": k}, v) for k, v in totals["responses"].items()])
    _metric(lines, "prefork_responses_by_code_total", "counter", "Responses by status code.",
            [({"code": k}, v) for k, v in totals["statuses"].items()])
    for key, help_text in (("bytes_in", "Request bytes received."),
                           ("bytes_out", "Response body bytes sent."),
                           ("connections_accepted", "Connections accepted."),
                           ("app_exceptions", "Exceptions raised by the app."),
                           ("rejected", "Requests refused by the parser (4xx)."),
                           ("timeouts", "Requests or workers cut by a timeout.")):
        _metric(lines, f"prefork_{key}_total", "counter", help_text, [({}, totals[key])])
    _metric(lines, "prefork_connections_evicted_total", "counter",
            "Connections closed to make room for new ones (idle ones first, then the "
            "slowest requests), at max_connections or out of descriptors.",
            [({}, totals.get("evicted", 0))])
    tls = totals.get("tls", {})
    _metric(lines, "prefork_tls_handshakes_total", "counter", "TLS handshakes completed.",
            [({}, tls.get("handshakes", 0))])
    _metric(lines, "prefork_tls_handshake_failures_total", "counter",
            "TLS handshakes that failed, by reason (plain_http, protocol_version, "
            "client_certificate, no_shared_cipher, timeout, reset, other).",
            [({"reason": k}, v) for k, v in sorted(tls.get("failures", {}).items())])
    http2 = totals.get("http2", {})
    for key, help_text in (("connections", "HTTP/2 connections (ALPN h2 or cleartext)."),
                           ("streams", "HTTP/2 streams answered or being answered."),
                           ("resets", "HTTP/2 streams the client reset (RST_STREAM).")):
        _metric(lines, f"prefork_http2_{key}_total", "counter", help_text,
                [({}, http2.get(key, 0))])
    _metric(lines, "prefork_http2_goaways_total", "counter",
            "GOAWAY frames sent, by reason (no_error: a graceful end; flood, "
            "protocol_error, compression_error...: the connection was cut).",
            [({"reason": k}, v) for k, v in sorted(http2.get("goaways", {}).items())])
    _metric(lines, "prefork_http2_connections_open", "gauge", "Open HTTP/2 connections.",
            [({}, http2.get("open", 0))])
    _metric(lines, "prefork_connections_open", "gauge", "Open client connections.",
            [({}, totals["connections_open"])])
    cumulative = 0
    buckets = []
    for bound, count in zip(list(BUCKETS) + ["+Inf"], latency["counts"], strict=True):
        cumulative += count
        buckets.append(({"le": bound}, cumulative))
    lines.append("# HELP prefork_request_duration_seconds Time from complete request to response end.")
    lines.append("# TYPE prefork_request_duration_seconds histogram")
    for labels, value in buckets:
        lines.append(f'prefork_request_duration_seconds_bucket{{le="{labels["le"]}"}} {value}')
    lines.append(f"prefork_request_duration_seconds_sum {latency['sum']}")
    lines.append(f"prefork_request_duration_seconds_count {latency['count']}")
    _metric(lines, "prefork_requests_per_second", "gauge", "Request rate over a window.",
            [({"window": k}, v) for k, v in s["rates"].items()])
    _metric(lines, "prefork_workers", "gauge", "Workers by state.",
            [({"state": "busy"}, pool["busy"]), ({"state": "idle"}, pool["idle"]),
             ({"state": "alive"}, pool["alive"]), ({"state": "target"}, pool["target"])])
    _metric(lines, "prefork_workers_spawned_total", "counter", "Workers started.",
            [({}, pool["spawned"])])
    _metric(lines, "prefork_worker_exits_total", "counter", "Worker exits by reason.",
            [({"reason": k}, v) for k, v in pool["exits"].items()])
    _metric(lines, "prefork_listen_queue_depth", "gauge", "Connections waiting in the listen queue.",
            [({}, s["listen_queue"]["depth"])])
    _metric(lines, "prefork_listen_queue_max", "gauge", "Largest listen queue seen.",
            [({}, s["listen_queue"]["max"])])
    workers = s["workers"]
    _metric(lines, "prefork_worker_requests_total", "counter", "Requests served by a worker.",
            [({"slot": w["slot"]}, w["requests"]) for w in workers])
    _metric(lines, "prefork_worker_busy", "gauge", "1 while the worker runs the app.",
            [({"slot": w["slot"]}, int(w["state"] == "busy")) for w in workers])
    threaded = [w for w in workers if w.get("threads")]
    _metric(lines, "prefork_worker_threads", "gauge",
            "A worker's app threads: at most (limit), started (alive), running a request (busy).",
            [({"slot": w["slot"], "state": k}, w["threads"][k]) for w in threaded
             for k in ("limit", "alive", "busy")])
    _metric(lines, "prefork_worker_requests_waiting", "gauge",
            "Complete requests waiting for a free app thread.",
            [({"slot": w["slot"]}, w["threads"]["waiting"]) for w in threaded])
    _metric(lines, "prefork_worker_thread_waits_total", "counter",
            "Requests that waited for a free app thread.",
            [({"slot": w["slot"]}, w["threads"]["waits"]) for w in threaded])
    _metric(lines, "prefork_worker_detached_total", "counter",
            "App calls the loop began that moved to a thread as they ran long.",
            [({"slot": w["slot"]}, w["threads"]["detaches"]) for w in threaded])
    _metric(lines, "prefork_worker_rss_bytes", "gauge", "Worker resident memory.",
            [({"slot": w["slot"]}, w["rss"]) for w in workers])
    _metric(lines, "prefork_worker_cpu_percent", "gauge", "Worker CPU use since the last snapshot.",
            [({"slot": w["slot"]}, w["cpu"]) for w in workers])
    _metric(lines, "prefork_worker_age_seconds", "gauge", "Seconds since the worker started.",
            [({"slot": w["slot"]}, w["age"]) for w in workers])
    reloads = pool.get("reloads", {})
    _metric(lines, "prefork_reloads_total", "counter", "Reloads by outcome.",
            [({"result": "ok"}, reloads.get("ok", 0)), ({"result": "failed"}, reloads.get("failed", 0))])
    logs = s.get("logs", {})
    _metric(lines, "prefork_log_healthy", "gauge", "1 while the log file is written without error.",
            [({"log": k}, int(not v["error"])) for k, v in logs.items()])
    _metric(lines, "prefork_log_lost_lines_total", "counter", "Lines the master could not write.",
            [({"log": k}, v["lost_lines"]) for k, v in logs.items()])
    _metric(lines, "prefork_lost_log_lines_total", "counter",
            "Lines workers dropped while the Manager was unreachable.",
            [({}, totals.get("lost_log_lines", 0))])
    _metric(lines, "prefork_recovered_requests_total", "counter",
            "Requests a killed worker ended but never reported, counted from its scoreboard "
            "slot (their status, bytes and latency unknown).",
            [({}, totals.get("recovered_requests", 0))])
    manager = s.get("manager", {})
    _metric(lines, "prefork_manager_restarts_total", "counter", "Manager processes replaced.",
            [({}, manager.get("restarts", 0))])
    return "\n".join(lines) + "\n"
