"""Scoreboard: one shared-memory slot per worker, in the manner of Apache's.

Owns: the slot layout, and the seats: one record per app thread's request
(worker/threads.py), `seats` of them beside each slot. Each worker writes only
its own slot and seats (cheap enough to do on every request: one write as it
begins, one as it ends, a seat's two as an app thread takes and frees it);
the master reads all slots to detect hung workers and to show what each one is
doing. Reads may be
torn; every field is display or heartbeat data where that is harmless. But no
field is ever seen zeroed: every write copies bytes packed beforehand, never
struct.pack_into, which zeroes its region before it fills it (a master reading
then saw a serving worker "empty", and a heartbeat of 0 would look stuck).
"""
from __future__ import annotations

import dataclasses
import mmap
import struct
from dataclasses import dataclass

EMPTY, BOOTING, IDLE, BUSY, STOPPING = range(5)
# A state byte -> 1 if the worker serves (IDLE or BUSY), else 0 (bytes.translate).
_SERVING = bytes(1 if state in (IDLE, BUSY) else 0 for state in range(256))
STATE_NAMES = ("empty", "booting", "idle", "busy", "stopping")

# pid, generation, booted, heartbeat | requests, last_status, last_duration |
# state | request_start, method, path | connections | the app threads: their
# limit, those alive, seats busy, requests waiting for a seat, requests that
# waited, inline calls detached. The state byte sits between the end of the
# last request and the start of this one, so that each of the two per-request
# writes is one copy that includes it.
_SLOT = struct.Struct("=iidd" "QHd" "B" "d8s120s" "I" "HHHIQI")
_IDENTITY = struct.Struct("=iidd")
_END = struct.Struct("=QHdB")       # requests, last_status, last_duration, state
_BEGIN = struct.Struct("=Bd8s120s")   # state, request_start, method, path
_HEARTBEAT = struct.Struct("=d")
_HEARTBEAT_AT = struct.calcsize("=iid")
_END_AT = _IDENTITY.size
_STATE_AT = _END_AT + struct.calcsize("=QHd")
_BEGIN_AT = _STATE_AT
_CONNECTIONS = struct.Struct("=I")
_CONNECTIONS_AT = _BEGIN_AT + _BEGIN.size
_THREADS = struct.Struct("=HHHIQI")
_THREADS_AT = _CONNECTIONS_AT + _CONNECTIONS.size
SLOT_SIZE = _SLOT.size
# A seat: state, request_start, method, path, client address.
_SEAT = struct.Struct("=Bd8s120s46s")
SEAT_SIZE = _SEAT.size


@dataclass(frozen=True)
class SlotView:
    slot: int
    pid: int
    generation: int
    booted: float
    heartbeat: float
    state: str
    request_start: float
    method: str
    path: str
    requests: int
    last_status: int
    last_duration: float
    connections: int
    threads: dict = dataclasses.field(default_factory=dict)   # limit, alive, busy, waiting, ...
    running: tuple = ()      # SeatView of each app thread's request
    inline_busy: bool = False   # the loop itself is in an app call

    def live_fields(self, now: float) -> dict:
        """The fields of a worker's status row that its slot keeps current
        (the status endpoint re-reads them at render time, so they are never
        an interval old). current: the loop's own app call; running: those
        of the app threads."""
        current = None
        if self.inline_busy:
            current = {"method": self.method, "path": self.path,
                       "elapsed": round(max(0.0, now - self.request_start), 3)}
        return {"requests": self.requests, "current": current,
                "running": [seat.row(now) for seat in self.running], "threads": self.threads,
                "last_status": self.last_status, "last_duration": round(self.last_duration, 6),
                "heartbeat_age": round(now - self.heartbeat, 1) if self.heartbeat else None}


@dataclass(frozen=True)
class SeatView:
    seat: int
    request_start: float
    method: str
    path: str
    client: str

    def row(self, now: float) -> dict:
        return {"thread": self.seat, "method": self.method, "path": self.path,
                "client": self.client, "elapsed": round(max(0.0, now - self.request_start), 3)}


def shown_state(stopping: bool, view: SlotView) -> str:
    """The one rule for the state a worker is shown in: "stopping" once the
    master told it to stop (the pool knows first), else what its slot says
    (booting, idle, busy), which the worker itself writes."""
    return "stopping" if stopping else view.state


def busy_idle(states) -> tuple:
    """(busy, idle) among worker state names."""
    states = list(states)
    return states.count("busy"), states.count("idle")


def _text(field: bytes) -> str:
    return field.rstrip(b"\0").decode("latin-1")


class Scoreboard:
    def __init__(self, slots: int, seats: int = 1):
        self.slots = slots
        self.seats = seats   # per slot: [workers] threads at most
        self._seats_at = SLOT_SIZE * slots
        # MAP_SHARED: survives fork. Seats never written take no memory.
        self._mem = mmap.mmap(-1, SLOT_SIZE * slots + SEAT_SIZE * seats * slots)

    # -- worker side (own slot only) -----------------------------------------
    def claim(self, slot: int, pid: int, generation: int, now: float) -> None:
        self._write(slot, 0, _SLOT.pack(pid, generation, now, now, 0, 0, 0.0, BOOTING,
                                        0.0, b"", b"", 0, 0, 0, 0, 0, 0, 0))

    def heartbeat(self, slot: int, now: float) -> None:
        self._write(slot, _HEARTBEAT_AT, _HEARTBEAT.pack(now))

    def _write(self, slot: int, at: int, data: bytes) -> None:
        start = slot * SLOT_SIZE + at
        self._mem[start:start + len(data)] = data

    def set_state(self, slot: int, state: int) -> None:
        self._mem[slot * SLOT_SIZE + _STATE_AT] = state

    def request_writers(self, slot: int) -> tuple:
        """(mem, begin_at, pack_begin, end_at, pack_end) for the slot's
        per-request fields, so that the hot path makes no Python call for them:
        `mem[begin_at] = pack_begin(BUSY, now, method bytes, target bytes)` as a
        request begins, `mem[end_at] = pack_end(requests, status, duration,
        IDLE)` as it ends (each one copy, as every write here)."""
        base = slot * SLOT_SIZE
        return (self._mem, slice(base + _BEGIN_AT, base + _BEGIN_AT + _BEGIN.size), _BEGIN.pack,
                slice(base + _END_AT, base + _END_AT + _END.size), _END.pack)

    def set_connections(self, slot: int, count: int) -> None:
        self._write(slot, _CONNECTIONS_AT, _CONNECTIONS.pack(count))

    def set_threads(self, slot: int, limit: int, alive: int, busy: int, waiting: int,
                    waits: int, detaches: int) -> None:
        self._write(slot, _THREADS_AT, _THREADS.pack(min(limit, self.seats), alive, busy,
                                                     waiting, waits, detaches))

    def _seat_at(self, slot: int, seat: int) -> int:
        return self._seats_at + (slot * self.seats + seat) * SEAT_SIZE

    def seat_busy(self, slot: int, seat: int, start: float, method: bytes, path: bytes,
                  client: bytes) -> None:
        if seat < self.seats:
            at = self._seat_at(slot, seat)
            self._mem[at:at + SEAT_SIZE] = _SEAT.pack(BUSY, start, method, path, client)

    def seat_idle(self, slot: int, seat: int) -> None:
        if seat < self.seats:
            self._mem[self._seat_at(slot, seat)] = IDLE

    def serving_connections(self) -> tuple:
        """(open connections, serving workers) over every slot: what a worker
        needs to take its fair share of new connections (at each accept: the
        slots' states are read in one slice, and only serving ones visited)."""
        total = workers = 0
        mem = self._mem
        serving = mem[_STATE_AT:self.slots * SLOT_SIZE:SLOT_SIZE].translate(_SERVING)
        slot = serving.find(1)
        while slot >= 0:
            workers += 1
            total += _CONNECTIONS.unpack_from(mem, slot * SLOT_SIZE + _CONNECTIONS_AT)[0]
            slot = serving.find(1, slot + 1)
        return total, workers

    # -- master side -------------------------------------------------------------
    def release(self, slot: int) -> None:
        """The slot's worker is gone: its slot and the seats it used are zeroed
        (only those: a seat never written takes no memory)."""
        used = min(self.seats, _THREADS.unpack_from(self._mem, slot * SLOT_SIZE + _THREADS_AT)[0])
        self._mem[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)
        start = self._seat_at(slot, 0)
        self._mem[start:start + SEAT_SIZE * used] = bytes(SEAT_SIZE * used)

    def read(self, slot: int) -> SlotView:
        """A worker's slot and its busy seats. A worker with app threads is
        busy while its loop or any of its threads runs a request."""
        (pid, generation, booted, heartbeat, requests, last_status, last_duration, state,
         request_start, method, path, connections, limit, alive, busy, waiting, waits,
         detaches) = _SLOT.unpack_from(self._mem, slot * SLOT_SIZE)
        running = tuple(self._read_seats(slot, limit)) if busy else ()
        inline_busy = state == BUSY
        if state == IDLE and running:
            state = BUSY
        threads = {"limit": limit, "alive": alive, "busy": len(running), "waiting": waiting,
                   "waits": waits, "detaches": detaches} if limit > 1 else {}
        return SlotView(slot, pid, generation, booted, heartbeat,
                        STATE_NAMES[state] if state < len(STATE_NAMES) else "unknown",
                        request_start, _text(method), _text(path), requests, last_status,
                        last_duration, connections, threads, running, inline_busy)

    def _read_seats(self, slot: int, limit: int):
        for seat in range(min(limit, self.seats)):
            state, start, method, path, client = _SEAT.unpack_from(
                self._mem, self._seat_at(slot, seat))
            if state == BUSY:
                yield SeatView(seat, start, _text(method), _text(path), _text(client))
