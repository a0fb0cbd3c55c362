"""The master's lifecycle as one value: where it is between start and exit.

Owns: the phases and every transition between them, here and nowhere else.
A transition that does not apply (a second TERM while stopping, a drain
before the first generation is ready) returns the value unchanged, so the
master asks for what a signal means and this module says what it becomes.
Must not: act (log, signal, close): the master does that after a change.

    STARTING --ready--> RUNNING --drain--> DRAINING --stop--> STOPPING --pool empty--> FINISHED
        \\________________\\_______________________stop_____________/^
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.Enum):
    STARTING = "starting"    # until the first generation is ready
    RUNNING = "running"
    DRAINING = "draining"    # TERM with [workers] drain_time: serving until `until`
    STOPPING = "stopping"    # workers told to stop; waiting for them to exit
    FINISHED = "finished"    # no worker left: the loop ends


@dataclass(frozen=True)
class Lifecycle:
    phase: Phase = Phase.STARTING
    until: float = 0.0       # DRAINING: when the graceful stop begins

    @property
    def serving(self) -> bool:
        """Spawning, reloading and recycling go on (not while draining or stopping)."""
        return self.phase in (Phase.STARTING, Phase.RUNNING)

    @property
    def stopping(self) -> bool:
        return self.phase in (Phase.STOPPING, Phase.FINISHED)

    def ready(self) -> Lifecycle:
        return Lifecycle(Phase.RUNNING) if self.phase is Phase.STARTING else self

    def drain(self, now: float, seconds: float) -> Lifecycle:
        """TERM with drain_time: only a running master drains, once."""
        return Lifecycle(Phase.DRAINING, now + seconds) if self.phase is Phase.RUNNING else self

    def drained(self, now: float) -> bool:
        return self.phase is Phase.DRAINING and now >= self.until

    def stop(self) -> Lifecycle:
        return self if self.stopping else Lifecycle(Phase.STOPPING)

    def workers_gone(self) -> Lifecycle:
        return Lifecycle(Phase.FINISHED) if self.phase is Phase.STOPPING else self
