"""``RUN_DIR/lock.json``: at most one driver per run directory, and what a lock left behind says."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from unioncam import storage
from unioncam.service.config import ConfigError

LOCK_HEARTBEAT = 30.0
LOCK_STALE = 300.0


def _log(message: str) -> None:
    print(f"[unioncam] {message}", flush=True)


class RunLock:
    """``RUN_DIR/lock.json``: at most one driver per run directory (a second one is refused).

    Created exclusively (``O_EXCL`` locally, a conditional PUT on S3/GCS). The holder rewrites it
    every :data:`LOCK_HEARTBEAT` seconds; a lock whose holder is a dead process on this host, or whose
    heartbeat is older than :data:`LOCK_STALE` seconds (a driver killed on another machine), is taken
    over. It is removed when the run ends, however it ends.
    """

    def __init__(self, out: str) -> None:
        self.path = storage.join(out, "lock.json")
        self.out = out
        self.beat = 0.0

    def _content(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                           "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        self.since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if storage.create_exclusive(self.path, self._content()):
            self.beat = time.monotonic()
            return
        held = self._holder()
        try:
            host, pid, beat = str(held["host"]), int(held["pid"]), float(held["heartbeat"])
        except (ValueError, KeyError, TypeError):
            held, host, pid, beat = {}, "?", -1, 0.0
        dead_here = host == socket.gethostname() and pid > 0 and not _alive(pid)
        if held and not dead_here and time.time() - beat < LOCK_STALE:
            raise ConfigError(
                f"another driver is running on {storage.redact(self.out)} (host {host}, pid {pid}, since "
                f"{held.get('since')}); wait for it to finish, or delete {storage.redact(self.path)} if it is gone")
        _log(f"taking over a stale lock on {storage.redact(self.out)} (host {host}, pid {pid})")
        storage.delete(self.path)
        if not storage.create_exclusive(self.path, self._content()):
            raise ConfigError(f"another driver took {storage.redact(self.path)} just now; only one may run")
        self.beat = time.monotonic()

    def heartbeat(self) -> None:
        """Refresh the lock (at most every :data:`LOCK_HEARTBEAT` s); raise if another driver took it."""
        if time.monotonic() - self.beat < LOCK_HEARTBEAT:
            return
        held = self._holder()
        if not self._mine(held):
            raise ConfigError(f"{storage.redact(self.path)} was taken by another driver (host {held.get('host')}, "
                              f"pid {held.get('pid')}); stopping this one")
        storage.write_bytes(self.path, self._content())
        self.beat = time.monotonic()

    def release(self) -> None:
        """Remove the lock if it is still this driver's (never another driver's that took it over)."""
        if self._mine(self._holder()):
            storage.delete(self.path)

    def _holder(self) -> dict[str, Any]:
        """The lock's content ({} when it is missing or unreadable)."""
        try:
            held = json.loads(storage.read_text(self.path))
        except (OSError, ValueError):
            return {}
        return held if isinstance(held, dict) else {}

    @staticmethod
    def _mine(held: dict[str, Any]) -> bool:
        return (held.get("host"), held.get("pid")) == (socket.gethostname(), os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_state(out: str) -> str | None:
    """None when ``out`` has no ``lock.json``, else one line on it: a driver running now (its host is
    this one and its pid alive, or its heartbeat is recent), or a lock left behind by a driver that
    is gone (killed: the next run takes it over)."""
    path = storage.join(out, "lock.json")
    if not storage.is_file(path):
        return None
    try:
        held = json.loads(storage.read_text(path))
        host, pid, beat = str(held["host"]), int(held["pid"]), float(held["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):
        return "lock.json is present but unreadable: a driver may have been killed while writing it"
    age = time.time() - beat
    here = host == socket.gethostname()
    if (here and _alive(pid)) or (not here and age < LOCK_STALE):
        return f"a driver holds lock.json (host {host}, pid {pid}, since {held.get('since')}): the run is in progress"
    return (f"lock.json was left behind by a driver that is gone (host {host}, pid {pid}, last heartbeat "
            f"{age:.0f} s ago): it was killed; rerun the command to finish the run (it takes the lock over)")
