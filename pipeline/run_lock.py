"""One driver per chain: the run folder is locked by the driver that owns it.

`owner.json` in the run folder says who holds it: host, pid, since when, the command. A second driver fails
at once naming the owner; a driver that died leaves its owner file behind, and the next one takes the folder
over and says so.

- A local (or shared POSIX) folder is held by an advisory lock (`filelock`, an flock on `<run folder>/.lock`;
  Linux's NFS client, and so EFS, carries it to the server as a POSIX lock), which the kernel (or the NFS
  server, once the owner's lease lapses) releases when its driver dies.
- Object storage has no locks, so the owner file is a lease: the driver renews it every
  `LEASE_SECONDS / 4`, and a lease not renewed for `LEASE_SECONDS` (or one whose driver ran on this host
  and is gone) is free. Two drivers that start within the same moment both write their lease; each reads
  it back after `SETTLE_SECONDS`, and the one whose write was overwritten leaves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from types import TracebackType

from filelock import FileLock, Timeout

from pipeline.storage import RunFolder

log = logging.getLogger(__name__)
LOCK_FILE, OWNER_FILE = ".lock", "owner.json"
LEASE_SECONDS = 60.0
SETTLE_SECONDS = 1.0


class RunFolderInUse(RuntimeError):
    """Another live driver owns the run folder."""


class RunFolderLock:
    """Held for a driver's whole chain: `with RunFolderLock(run_folder): ...`."""

    def __init__(self, run_folder: RunFolder) -> None:
        self.run_folder = run_folder
        self._owner_file = run_folder / OWNER_FILE
        self._lock = FileLock(run_folder.local_path / LOCK_FILE, timeout=0) if run_folder.is_local else None
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "command": " ".join(sys.argv), "token": uuid.uuid4().hex}
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self._owner_file.read_text())
        except (OSError, ValueError):
            return None

    def _in_use(self, owner: dict | None) -> RunFolderInUse:
        return RunFolderInUse(f"{self.run_folder} is in use by another driver ({_describe(owner)}); "
                              "wait for it to end or stop it, then run the same command to resume")

    def __enter__(self) -> RunFolderLock:
        if self._lock is not None:
            try:
                self._lock.acquire()
            except Timeout:
                raise self._in_use(self._read_owner()) from None
            previous = self._read_owner()
        else:
            previous = self._read_owner()
            if previous is not None and _lease_is_live(previous):
                raise self._in_use(previous)
        if previous is not None:
            log.warning("took over %s from a driver that is no longer running (%s)", self.run_folder, _describe(previous))
        self._write_owner()
        if self._lock is None:
            time.sleep(SETTLE_SECONDS)  # a driver that started at the same moment has written its lease by now
            current = self._read_owner()
            if current is None or current.get("token") != self._owner["token"]:
                raise self._in_use(current)
            self._renewer = threading.Thread(target=self._renew, name="run-folder-lease", daemon=True)
            self._renewer.start()
        return self

    def _write_owner(self) -> None:
        self._owner_file.write_text(json.dumps(self._owner | {"renewed": time.time()}) + "\n")

    def _renew(self) -> None:
        while not self._stop_renewing.wait(LEASE_SECONDS / 4):
            try:
                current = self._read_owner()
                if current is not None and current.get("token") != self._owner["token"]:
                    # this driver was not heard from for a whole lease (paused, or cut off from the store) and another
                    # took the folder over: renewing would take it back from under that one
                    log.error("lost the run folder %s to another driver (%s); this driver's results may be overwritten",
                              self.run_folder, _describe(current))
                    return
                self._write_owner()
            except OSError as error:  # a store that is briefly unreachable: the next renewal may succeed
                log.warning("could not renew the lease on %s: %s", self.run_folder, error)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        current = self._read_owner()
        if current is not None and current.get("token") == self._owner["token"]:
            self._owner_file.delete()
        if self._lock is not None:
            self._lock.release()


def _lease_is_live(owner: dict) -> bool:
    """A lease renewed within LEASE_SECONDS whose driver, when it ran on this host, still runs."""
    if time.time() - float(owner.get("renewed", 0)) > LEASE_SECONDS:
        return False
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            return True
    return True


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "owner unknown"
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')}: {owner.get('command')}"
