"""Signal inbox: handlers only record; the owning loop acts.

Owns: installing no-op handlers and a wakeup pipe (set_wakeup_fd) so that a
loop blocked in select/epoll wakes up when a signal lands. The pipe is also the
record: CPython's C-level handler writes each signal's number to it at once,
on whatever thread, while a Python handler runs only when the main thread next
runs Python code (in a worker with app threads, the main thread may be stuck
in an app's call and the loop on another thread). Must not: do any work inside
a handler (no logging, no I/O, no waitpid).
"""
from __future__ import annotations

import os
import signal

DUMP_SIGNAL = signal.SIGUSR2   # to a worker: write every thread's stack (faulthandler)
DRAIN_SIGNAL = signal.SIGUSR1  # to a worker: the server is draining, health answers 503


class SignalInbox:
    def __init__(self, signums):
        self.wakeup_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signums = tuple(signums)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._signums:
            signal.signal(signum, self._ignore)
        # Restart interrupted system calls where possible: the pipe wakes us.
        for signum in self._signums:
            signal.siginterrupt(signum, False)

    @staticmethod
    def _ignore(signum, frame):
        """Installed so that the signal is caught (the pipe records it)."""

    def drain(self):
        """Empty the wakeup pipe: the signals that landed, in order."""
        taken = []
        try:
            while True:
                data = os.read(self.wakeup_fd, 4096)
                if not data:
                    break
                taken.extend(data)
        except BlockingIOError:
            pass
        return taken

    def close(self):
        """In a forked child: forget the parent's handlers and pipe."""
        signal.set_wakeup_fd(-1)
        for signum in self._signums:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wakeup_fd)
        os.close(self._write_fd)
