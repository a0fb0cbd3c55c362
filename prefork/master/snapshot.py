"""The published snapshot: the server as one plain dict, built from a view.

Owns: the snapshot's shape (documented in README, relied on by dashboards and
`bin/prefork status`), the listen-queue reading and its deepest value, and
per-worker process figures (psutil, which needs its Process objects kept
between calls for CPU percentages).
Must not: change anything in the master: it reads the View it is given.
"""
from __future__ import annotations

import collections
import dataclasses
import platform

import psutil

from .. import __version__
from ..scoreboard import busy_idle, shown_state
from ..sockets import queue_depth
from ..stats import BUCKETS, percentile, unreported


@dataclasses.dataclass(frozen=True)
class View:
    """What the master shows of itself, gathered once per snapshot."""
    pid: int
    started_wall: float
    uptime: float
    generation: int
    config_source: str
    listeners: list          # sockets
    urls: list
    state: str               # running, degraded, reloading, stopping
    target: int
    pool: object             # the Pool (read only)
    reloads: dict
    totals: object           # stats.Totals
    timeouts: int            # workers stopped as stuck by the watchdog
    lost_lines: int          # log lines lost to Manager outages (ipc.LineLedger)
    open_connections: dict   # pid -> connections
    rates: dict
    logs: dict
    manager: dict            # the Manager channel: pid, restarts, state
    reported: dict           # pid -> app requests its deltas have reported
    tls_open: int = 0        # TLS connections open, as the workers last reported
    http2_open: int = 0      # HTTP/2 connections open, the same way


HISTORY_POINTS = 300   # samples of the traffic charts: 5 minutes at the default interval


class SnapshotBuilder:
    def __init__(self, scoreboard):
        self.scoreboard = scoreboard
        self._processes = {}          # pid -> psutil.Process
        self.listen_queue_max = 0
        # (wall time, requests/s, p50, p99) per interval, for the dashboard's charts
        self.history: collections.deque = collections.deque(maxlen=HISTORY_POINTS)
        self._last_sample = None      # (monotonic time, requests, histogram)

    def sample(self, totals, now: float, wall: float) -> None:
        """One point of the charts: the interval's rate and percentiles (from
        the histogram's growth since the last point, not the totals')."""
        counts = list(totals.histogram)
        if self._last_sample is not None:
            then, requests, before = self._last_sample
            grown = [a - b for a, b in zip(counts, before, strict=True)]
            rate = (totals.requests - requests) / (now - then) if now > then else 0.0
            self.history.append((round(wall, 1), round(rate, 1), percentile(grown, 0.50),
                                 percentile(grown, 0.99)))
        self._last_sample = (now, totals.requests, counts)

    def process_figures(self, pid: int) -> tuple:
        """(rss bytes, cpu percent since the last call) for a worker."""
        proc = self._processes.get(pid)
        try:
            if proc is None:
                proc = self._processes[pid] = psutil.Process(pid)
                proc.cpu_percent(None)
            return proc.memory_info().rss, proc.cpu_percent(None)
        except psutil.Error:
            self._processes.pop(pid, None)
            return 0, 0.0

    def worker_row(self, rec, now: float, reported: int) -> dict:
        view = self.scoreboard.read(rec.slot)
        rss, cpu = self.process_figures(rec.pid)
        return {
            "slot": rec.slot, "pid": rec.pid, "generation": rec.generation,
            "state": shown_state(rec.state == "stopping", view),
            "rss": rss, "cpu": cpu, "age": round(now - rec.spawned, 1),
            "reported": reported,
            **view.live_fields(now),
        }

    def listen_queue(self, listeners) -> dict:
        depth = limit = 0
        for sock in listeners:
            waiting, most = queue_depth(sock)
            depth += waiting
            limit += most
        self.listen_queue_max = max(self.listen_queue_max, depth)
        return {"depth": depth, "max": self.listen_queue_max, "limit": limit}

    def build(self, view: View, now: float) -> dict:
        pool, totals = view.pool, view.totals
        rows = [self.worker_row(rec, now, view.reported.get(rec.pid, 0))
                for rec in sorted(pool, key=lambda r: r.slot)]
        for pid in list(self._processes):
            if pool.get(pid) is None:
                del self._processes[pid]
        busy, idle = busy_idle(row["state"] for row in rows)
        return {
            "server": {
                "version": __version__, "pid": view.pid, "started": view.started_wall,
                "uptime": round(view.uptime, 1), "generation": view.generation,
                "config": view.config_source, "listeners": view.urls,
                "python": platform.python_version(), "state": view.state,
            },
            "pool": {
                "target": view.target, "alive": len(rows), "busy": busy,
                "idle": idle, "spawned": pool.spawns, "exits": dict(pool.exits),
                "boot_failures": pool.boot_failures, "last_boot_error": pool.last_boot_error,
                "reloads": view.reloads,
            },
            "totals": {
                "requests": totals.requests,
                "responses": totals.responses_by_class(),
                "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
                "bytes_in": totals.bytes_in, "bytes_out": totals.bytes_out,
                "connections_accepted": totals.connections_accepted,
                "connections_open": sum(view.open_connections.get(r["pid"], 0) for r in rows),
                "app_exceptions": totals.app_exceptions, "rejected": totals.rejected,
                "timeouts": totals.timeouts + view.timeouts,
                "lost_log_lines": view.lost_lines,
                "recovered_requests": totals.recovered,
                # requests as the live rows count them: the interval's not yet
                # reported included (no status or latency known for those yet)
                "requests_live": totals.requests + unreported(rows),
                "evicted": totals.evicted,
                "tls": {"handshakes": totals.tls_handshakes, "failures": totals.tls_failures,
                        "open": view.tls_open},
                "http2": {"connections": totals.http2_connections, "open": view.http2_open,
                          "streams": totals.http2_streams, "resets": totals.http2_resets,
                          "goaways": totals.http2_goaways},
            },
            "rates": view.rates,
            "latency": {
                "p50": percentile(totals.histogram, 0.50),
                "p90": percentile(totals.histogram, 0.90),
                "p99": percentile(totals.histogram, 0.99),
                "buckets": list(BUCKETS), "counts": list(totals.histogram),
                "sum": round(totals.duration_sum, 6), "count": sum(totals.histogram),
            },
            "listen_queue": self.listen_queue(view.listeners),
            "workers": rows,
            "logs": view.logs,
            "manager": view.manager,
            "history": {key: [point[i] for point in self.history]
                        for i, key in enumerate(("t", "rps", "p50", "p99"))},
        }
