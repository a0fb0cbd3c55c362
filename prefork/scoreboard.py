"""Scoreboard: one shared-memory slot per worker, in the manner of Apache's.

Owns: the slot layout. Each worker writes only its own slot (cheap enough to do
on every request: one write as it begins, one as it ends); the master reads all
slots to detect hung workers and to show what each one is doing. Reads may be
torn; every field is display or heartbeat data where that is harmless. But no
field is ever seen zeroed: every write copies bytes packed beforehand, never
struct.pack_into, which zeroes its region before it fills it (a master reading
then saw a serving worker "empty", and a heartbeat of 0 would look stuck).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

EMPTY, BOOTING, IDLE, BUSY, STOPPING = range(5)
STATE_NAMES = ("empty", "booting", "idle", "busy", "stopping")

# pid, generation, booted, heartbeat | requests, last_status, last_duration |
# state | request_start, method, path | connections. The state byte sits
# between the end of the last request and the start of this one, so that each
# of the two per-request writes is one copy that includes it.
_SLOT = struct.Struct("=iidd" "QHd" "B" "d8s120s" "I")
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
SLOT_SIZE = _SLOT.size


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

    def live_fields(self, now: float) -> dict:
        """The fields of a worker's status row that its slot keeps current
        (the status endpoint re-reads them at render time, so they are never
        an interval old)."""
        current = None
        if self.state == "busy":
            current = {"method": self.method, "path": self.path,
                       "elapsed": round(max(0.0, now - self.request_start), 3)}
        return {"requests": self.requests, "current": current,
                "last_status": self.last_status, "last_duration": round(self.last_duration, 6),
                "heartbeat_age": round(now - self.heartbeat, 1) if self.heartbeat else None}


def busy_idle(states) -> tuple:
    """(busy, idle) among worker state names."""
    states = list(states)
    return states.count("busy"), states.count("idle")


class Scoreboard:
    def __init__(self, slots: int):
        self.slots = slots
        self._mem = mmap.mmap(-1, SLOT_SIZE * slots)   # MAP_SHARED: survives fork

    # -- worker side (own slot only) -----------------------------------------
    def claim(self, slot: int, pid: int, generation: int, now: float) -> None:
        self._write(slot, 0, _SLOT.pack(pid, generation, now, now, 0, 0, 0.0, BOOTING,
                                        0.0, b"", b"", 0))

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

    def serving_connections(self) -> tuple:
        """(open connections, serving workers) over every slot: what a worker
        needs to take its fair share of new connections."""
        total = workers = 0
        mem = self._mem
        for slot in range(self.slots):
            if mem[slot * SLOT_SIZE + _STATE_AT] in (IDLE, BUSY):
                workers += 1
                total += _CONNECTIONS.unpack_from(mem, slot * SLOT_SIZE + _CONNECTIONS_AT)[0]
        return total, workers

    # -- master side -------------------------------------------------------------
    def release(self, slot: int) -> None:
        self._mem[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)

    def read(self, slot: int) -> SlotView:
        (pid, generation, booted, heartbeat, requests, last_status, last_duration, state,
         request_start, method, path, connections) = _SLOT.unpack_from(
             self._mem, slot * SLOT_SIZE)
        return SlotView(slot, pid, generation, booted, heartbeat,
                        STATE_NAMES[state] if state < len(STATE_NAMES) else "unknown",
                        request_start, method.rstrip(b"\0").decode("latin-1"),
                        path.rstrip(b"\0").decode("latin-1"), requests, last_status,
                        last_duration, connections)
