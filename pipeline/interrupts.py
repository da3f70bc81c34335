"""A clean stop of the driver on SIGINT or SIGTERM.

Both signals raise `Stopped` in the driver's main thread, wherever it is (Ray start, zero-shot, training,
scoring, logging, export), or a bare KeyboardInterrupt from inside Ray's native waits (`as_stopped`). It
is a KeyboardInterrupt, so the chain's MLflow runs end KILLED on the way out
(`pipeline.tracking.ChainTracker`); the manifest and checkpoints are written atomically, so the same
command resumes. The driver waits on the worker group's results with a timeout of 0.5 s
(`pipeline.chain`), so a signal is acted on within a second.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The driver was told to stop by `signum`; the exit status is 128 + signum (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the signal that started the stop


def _raise_stopped(signum: int, frame: Any) -> None:
    # later signals are ignored: the stop that is under way (marking runs, ending Ray) must not be cut short
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    _received.append(signum)
    raise Stopped(signum)


def as_stopped(interrupt: KeyboardInterrupt) -> Stopped:
    """The `Stopped` behind `interrupt`. Ray's native waits run the signal handler themselves and raise a plain
    KeyboardInterrupt in place of its exception, whatever the signal was: the handler's record says which."""
    if isinstance(interrupt, Stopped):
        return interrupt
    return Stopped(_received[0] if _received else signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Stopped` in this (main) thread; the previous handlers come back after."""
    _received.clear()  # a stop of an earlier command in this process is not this one's
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

