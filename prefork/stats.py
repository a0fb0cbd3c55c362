"""Statistics: worker-side counters, the deltas they ship, the master's fold,
and the figures derived from them (rates, percentiles).

Pure: no I/O, no IPC and no clock reads here. Workers count locally (a few
attribute bumps per request) and hand a frozen StatsDelta to their sink once
per interval; the master folds deltas into Totals that survive worker restarts
and reloads.
"""
from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

# Latency histogram upper bounds, seconds (Prometheus-style, +Inf implied).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)
_bucket = bisect.bisect_left   # the histogram bucket of a duration
_FIRST_BOUND = BUCKETS[0]
# Status codes are three digits (start_response checks; ours are constants),
# so a worker counts them in a list indexed by code: a list bump costs about
# half of a dict's get-and-set.
_STATUS_CODES = 1000


@dataclass(frozen=True)
class StatsDelta:
    """What one worker counted since its last shipment."""
    pid: int
    requests: int
    statuses: dict
    bytes_in: int
    bytes_out: int
    connections_accepted: int
    app_exceptions: int
    rejected: int
    timeouts: int
    histogram: tuple
    duration_sum: float
    open_connections: int = 0     # a gauge: the worker's count when it shipped
    lost_lines: int = 0           # log lines dropped during a Manager outage
    evicted: int = 0              # connections closed to make room for new ones
    tls: tuple = (0, (), 0)       # TLS: handshakes done, ((failure reason, count), ...), open (a gauge)
    # HTTP/2: connections, streams, streams the client reset, ((GOAWAY reason, count), ...),
    # connections open (a gauge)
    http2: tuple = (0, 0, 0, (), 0)


class WorkerStats:
    """Per-worker counters since the last delta."""

    def __init__(self, pid=0):
        self.pid = pid
        self._last_ship = 0.0
        self._reset()

    def _reset(self):
        self._by_status = [0] * _STATUS_CODES
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections_accepted = 0
        self.app_exceptions = 0
        self.rejected = 0
        self.timeouts = 0
        self.evicted = 0
        self.tls_handshakes = 0
        self.tls_failures = {}   # reason -> count (tls.failure_reason)
        self.http2_connections = 0
        self.http2_streams = 0
        self.http2_resets = 0
        self.http2_goaways = {}  # reason (http/http2.py REASONS) -> count
        self.histogram = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0

    def record(self, status: int, body_bytes: int, duration: float) -> None:
        self._by_status[status] += 1
        self.bytes_out += body_bytes
        self.duration_sum += duration
        # A fast request lands in the first bucket without a search (bisect
        # costs more than the rest of this method).
        self.histogram[0 if duration <= _FIRST_BOUND else _bucket(BUCKETS, duration)] += 1

    def record_rejected(self, status: int) -> None:
        """A request the parser refused: a request and a response like any,
        counted among the rejected, not in the latencies."""
        self.rejected += 1
        self._by_status[status] += 1

    @property
    def statuses(self) -> dict:
        """Responses by status code since the last delta."""
        return {code: count for code, count in enumerate(self._by_status) if count}

    def due(self, now: float, interval: float) -> bool:
        return now - self._last_ship >= interval

    def take_delta(self, now: float, open_connections: int = 0, lost_lines: int = 0,
                   tls_open: int = 0, http2_open: int = 0) -> StatsDelta:
        statuses = self.statuses
        # One definition everywhere: a request is a response sent, the app's or
        # the parser's refusal (rejected, a part of it: 400, 408, 431...), so
        # the statuses add up to the requests. Latencies are the app's only.
        requests = sum(statuses.values())
        delta = StatsDelta(self.pid, requests, statuses, self.bytes_in, self.bytes_out,
                           self.connections_accepted, self.app_exceptions, self.rejected,
                           self.timeouts, tuple(self.histogram), self.duration_sum,
                           open_connections, lost_lines, self.evicted,
                           (self.tls_handshakes, tuple(self.tls_failures.items()), tls_open),
                           (self.http2_connections, self.http2_streams, self.http2_resets,
                            tuple(self.http2_goaways.items()), http2_open))
        self._last_ship = now
        self._reset()
        return delta


@dataclass
class Totals:
    """Master side: everything since the master started (one writer: the master)."""
    requests: int = 0
    statuses: dict = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    connections_accepted: int = 0
    app_exceptions: int = 0
    rejected: int = 0
    timeouts: int = 0
    histogram: list = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    duration_sum: float = 0.0
    recovered: int = 0       # requests a killed worker ended but never reported (no details)
    evicted: int = 0         # connections closed to make room for new ones
    tls_handshakes: int = 0
    tls_failures: dict = field(default_factory=dict)   # reason -> count
    http2_connections: int = 0
    http2_streams: int = 0
    http2_resets: int = 0
    http2_goaways: dict = field(default_factory=dict)  # reason -> count

    def recover(self, requests: int) -> None:
        """Requests counted from a dead worker's slot: in the requests, their
        status, bytes and latency unknown."""
        self.requests += requests
        self.recovered += requests

    def fold(self, delta: StatsDelta) -> None:
        self.requests += delta.requests
        for status, count in delta.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.bytes_in += delta.bytes_in
        self.bytes_out += delta.bytes_out
        self.connections_accepted += delta.connections_accepted
        self.app_exceptions += delta.app_exceptions
        self.rejected += delta.rejected
        self.timeouts += delta.timeouts
        self.evicted += delta.evicted
        handshakes, failures, _ = delta.tls
        self.tls_handshakes += handshakes
        for reason, count in failures:
            self.tls_failures[reason] = self.tls_failures.get(reason, 0) + count
        connections, streams, resets, goaways, _ = delta.http2
        self.http2_connections += connections
        self.http2_streams += streams
        self.http2_resets += resets
        for reason, count in goaways:
            self.http2_goaways[reason] = self.http2_goaways.get(reason, 0) + count
        for i, count in enumerate(delta.histogram):
            self.histogram[i] += count
        self.duration_sum += delta.duration_sum

    def responses_by_class(self) -> dict:
        classes = {f"{n}xx": 0 for n in range(1, 6)}
        for status, count in self.statuses.items():
            key = f"{status // 100}xx"
            if key in classes:
                classes[key] += count
        return classes


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


def unreported(rows) -> int:
    """Requests the workers' slots have counted (each status row's live
    "requests") beyond what their deltas have reported to the master: what
    the totals will add at the next interval."""
    return sum(max(0, row["requests"] - row.get("reported", row["requests"])) for row in rows)


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
