"""The published snapshot: the master's view of the server as one plain dict.

Owns: the snapshot's shape (documented in README, relied on by dashboards),
request rates over sliding windows, latency percentiles from the histogram,
the listen-queue reading, and per-worker process figures (psutil).
Must not: change master state (it only records the deepest listen queue seen).
"""
from __future__ import annotations

import collections
import platform
import time

import psutil

from . import __version__
from .sockets import queue_depth
from .stats import BUCKETS

_processes = {}                            # pid -> psutil.Process (cpu_percent needs history)


class RateWindow:
    """Requests per second over the last 1, 10 and 60 seconds."""

    WINDOWS = (1, 10, 60)

    def __init__(self):
        self._samples = collections.deque()   # (monotonic time, total requests)

    def observe(self, now: float, total: int) -> None:
        samples = self._samples
        samples.append((now, total))
        while len(samples) > 2 and samples[1][0] < now - max(self.WINDOWS):
            samples.popleft()

    def rates(self) -> dict:
        if not self._samples:
            return {f"{w}s": 0.0 for w in self.WINDOWS}
        now, total = self._samples[-1]
        result = {}
        for window in self.WINDOWS:
            then, before = self._samples[0]
            for at, count in self._samples:
                if at >= now - window:
                    break
                then, before = at, count
            elapsed = now - then
            result[f"{window}s"] = round((total - before) / elapsed, 2) if elapsed > 0 else 0.0
        return result


def percentile(histogram, fraction: float) -> float:
    """Linear interpolation inside the bucket holding the fraction-th request."""
    total = sum(histogram)
    if total == 0:
        return 0.0
    rank = fraction * total
    seen = 0
    lower = 0.0
    for i, count in enumerate(histogram):
        upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1] * 2
        if count and seen + count >= rank:
            return round(lower + (upper - lower) * (rank - seen) / count, 6)
        seen += count
        lower = upper
    return BUCKETS[-1]


def listen_queue(listeners) -> dict:
    depth = limit = 0
    for sock in listeners:
        waiting, most = queue_depth(sock)
        depth += waiting
        limit += most
    return {"depth": depth, "limit": limit}


def process_figures(pid: int) -> tuple:
    """(rss bytes, cpu percent since the last call) for a worker."""
    proc = _processes.get(pid)
    try:
        if proc is None:
            proc = _processes[pid] = psutil.Process(pid)
            proc.cpu_percent(None)
        return proc.memory_info().rss, proc.cpu_percent(None)
    except psutil.Error:
        _processes.pop(pid, None)
        return 0, 0.0


def live_fields(view, now: float) -> dict:
    """A worker's fields that its scoreboard slot keeps current (the status
    endpoint re-reads them at render time, so they are never an interval old)."""
    current = None
    if view.state == "busy":
        current = {"method": view.method, "path": view.path,
                   "elapsed": round(max(0.0, now - view.request_start), 3)}
    return {"requests": view.requests, "current": current,
            "last_status": view.last_status, "last_duration": round(view.last_duration, 6),
            "heartbeat_age": round(now - view.heartbeat, 1) if view.heartbeat else None}


def busy_idle(rows) -> tuple:
    busy = sum(1 for r in rows if r["state"] == "busy")
    return busy, sum(1 for r in rows if r["state"] == "idle")


def worker_row(master, rec, now: float) -> dict:
    view = master.scoreboard.read(rec.slot)
    rss, cpu = process_figures(rec.pid)
    return {
        "slot": rec.slot, "pid": rec.pid, "generation": rec.generation,
        "state": "stopping" if rec.state == "stopping" else
                 ("booting" if rec.state == "booting" else view.state),
        "rss": rss, "cpu": cpu, "age": round(now - rec.spawned, 1),
        **live_fields(view, now),
    }


def build(master) -> dict:
    now = master.now = time.monotonic()
    totals = master.totals
    rows = [worker_row(master, rec, now) for rec in sorted(master.workers.values(),
                                                           key=lambda r: r.slot)]
    for pid in list(_processes):
        if pid not in master.workers:
            del _processes[pid]
    busy, idle = busy_idle(rows)
    queue = listen_queue(master.listeners.values())
    master.listen_queue_max = max(master.listen_queue_max, queue["depth"])
    degraded = master.boot_failures > 0
    return {
        "server": {
            "version": __version__, "pid": master.pid, "started": master.started_wall,
            "uptime": round(now - master.started, 1), "generation": master.generation,
            "config": master.config.source, "listeners": master.urls(),
            "python": platform.python_version(),
            "state": "stopping" if master.stopping else
                     ("reloading" if master.pending else ("degraded" if degraded else "running")),
        },
        "pool": {
            "target": master.target, "alive": len(rows), "busy": busy,
            "idle": idle, "spawned": master.spawned, "exits": dict(master.exits),
            "boot_failures": master.boot_failures, "last_boot_error": master.last_boot_error,
            "reloads": dict(master.reloads),
        },
        "totals": {
            "requests": totals.requests,
            "responses": totals.responses_by_class(),
            "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
            "bytes_in": totals.bytes_in, "bytes_out": totals.bytes_out,
            "connections_accepted": totals.connections_accepted,
            "connections_open": sum(master.open_connections.get(r["pid"], 0) for r in rows),
            "app_exceptions": totals.app_exceptions, "rejected": totals.rejected,
            "timeouts": totals.timeouts,
        },
        "rates": master.rates.rates(),
        "latency": {
            "p50": percentile(totals.histogram, 0.50),
            "p90": percentile(totals.histogram, 0.90),
            "p99": percentile(totals.histogram, 0.99),
            "buckets": list(BUCKETS), "counts": list(totals.histogram),
            "sum": round(totals.duration_sum, 6), "count": sum(totals.histogram),
        },
        "listen_queue": {"depth": queue["depth"], "max": master.listen_queue_max,
                         "limit": queue["limit"]},
        "workers": rows,
        "logs": master.files.describe() if master.files else {},
    }
