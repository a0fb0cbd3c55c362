"""Signal inbox: handlers only record; the owning loop acts.

Owns: installing no-op recording handlers and a wakeup pipe (set_wakeup_fd) so
that a loop blocked in select/epoll wakes up when a signal lands. Must not: do
any work inside a handler (no logging, no I/O, no waitpid).
"""
from __future__ import annotations

import collections
import os
import signal

DUMP_SIGNAL = signal.SIGUSR2   # to a worker: write every thread's stack (faulthandler)
DRAIN_SIGNAL = signal.SIGUSR1  # to a worker: the server is draining, health answers 503


class SignalInbox:
    def __init__(self, signums):
        self.pending = collections.deque()
        self.wakeup_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signums = tuple(signums)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._signums:
            signal.signal(signum, self._record)
        # Restart interrupted system calls where possible: the pipe wakes us.
        for signum in self._signums:
            signal.siginterrupt(signum, False)

    def _record(self, signum, frame):
        self.pending.append(signum)

    def drain(self):
        """Empty the wakeup pipe and return the signals recorded, in order."""
        try:
            while os.read(self.wakeup_fd, 4096):
                pass
        except BlockingIOError:
            pass
        taken = []
        while self.pending:
            taken.append(self.pending.popleft())
        return taken

    def close(self):
        """In a forked child: forget the parent's handlers and pipe."""
        signal.set_wakeup_fd(-1)
        for signum in self._signums:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wakeup_fd)
        os.close(self._write_fd)
