"""What a signal does to a command: SIGTERM and SIGHUP stop it where Ctrl-C would (what it finished kept), and
its exit status says which signal (128 + N), as a batch system reads it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the work stops as at Ctrl-C (what it finished kept); exit status 128 + N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Signalled` inside the block (they ended the process at once: a run's finished work
    was lost); outside the main thread, which alone takes signals, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once (a run stuck in a C call)
        raise Signalled(signum)

    # a signal set to be ignored stays so (`nohup`'s SIGHUP: a closed terminal must not stop the run)
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
