"""One driver per chain: the run folder is locked by the driver that owns it.

An advisory lock (`filelock`, an flock on `<run folder>/.lock`; Linux's NFS client, and so EFS, carries it
to the server as a POSIX lock) plus `owner.json` saying who holds it: host, pid, since when, the command.
A second driver fails at once naming the owner. The kernel (or the NFS server, once the owner's lease
lapses) releases the lock of a driver that died, so its owner file is what a dead owner leaves behind: the
next driver takes the folder over and says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from procl.atomic import atomic_write_text

log = logging.getLogger(__name__)
LOCK_FILE, OWNER_FILE = ".lock", "owner.json"


class RunFolderInUse(RuntimeError):
    """Another live driver owns the run folder."""


class RunFolderLock:
    """Held for a driver's whole chain: `with RunFolderLock(run_dir): ...`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock = FileLock(run_dir / LOCK_FILE, timeout=0)
        self._owner = run_dir / OWNER_FILE

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self._owner.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunFolderLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise RunFolderInUse(f"{self.run_dir} is in use by another driver ({_describe(self._read_owner())}); "
                                 "wait for it to end or stop it, then run the same command to resume") from None
        previous = self._read_owner()
        if previous is not None:
            log.warning("took over %s from a driver that is no longer running (%s)", self.run_dir, _describe(previous))
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "command": " ".join(sys.argv)}
        atomic_write_text(self._owner, json.dumps(owner) + "\n")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._owner.unlink(missing_ok=True)
        self._lock.release()


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "owner unknown"
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')}: {owner.get('command')}"
