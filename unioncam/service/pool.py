"""The driver's pool of shard workers, in the shape of ``ray.util.ActorPool``: start the workers,
hand each started one up to :data:`PER_WORKER` shards at a time (one computes while the other's
files are written), collect what finishes, replace a worker that dies, give up one that does not
start in time. It knows no Ray: a :class:`Backend` runs the workers (Ray actors in
:mod:`unioncam.service.runner`, a stand-in in ``benchmarks/bench_driver_scale.py``).

Pull-based: a worker gets its next shard when one of its own returns, so fast workers take more.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

PER_WORKER = 2  # shards in flight per worker: one computing, one being written


class WorkerStartError(RuntimeError):
    """A worker could not start (e.g. bad weights): every shard would fail the same way."""


class WorkerDiedError(Exception):
    """A worker process died while it held a shard (its other shard fails too)."""


class ShardFailedError(Exception):
    """A shard's task raised; its worker lives on."""


class Backend(Protocol):
    """What runs the workers. ``info`` and ``run`` return references that ``wait`` and ``get`` take."""

    def start(self) -> Any:
        """A new worker (its handle)."""

    def info(self, worker: Any) -> Any:
        """A reference to the worker's ``info()``: its first answer, once it has started."""

    def run(self, worker: Any, shard: str) -> Any:
        """A reference to the worker's evaluation of ``shard``."""

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        """The references in ``refs`` that are ready: at least one, or none after ``timeout`` s."""

    def get(self, ref: Any) -> Any:
        """A ready reference's value. Raises :class:`WorkerStartError` (the worker could not
        start), :class:`WorkerDiedError` or :class:`ShardFailedError`, each with the root cause."""

    def kill(self, worker: Any) -> None:
        """Stop a worker for good."""


@dataclass
class Outcome:
    """A finished shard: its ``result`` (the worker's counts), or ``error`` when it failed."""

    shard: str
    result: dict[str, Any] | None
    error: str | None
    slot: int


class ShardPool:
    """``size`` workers taking ``shards``.

    Args:
        on_start: called with each worker's ``info()`` as it starts.
        start_timeout: seconds a worker may take to start; one that has not is given up (the others
            go on), and none started at all raises :class:`WorkerStartError` (``no_worker`` says why).
    """

    def __init__(self, backend: Backend, size: int, shards: Iterable[str], start_timeout: float,
                 on_start: Callable[[dict[str, Any]], None], no_worker: Callable[[], str],
                 log: Callable[[str], None]) -> None:
        self.backend, self.start_timeout, self.on_start, self.no_worker, self.log = (
            backend, start_timeout, on_start, no_worker, log)
        self.workers: list[Any] = [None] * size  # None: a slot given up (its worker never started)
        self.starting: dict[Any, tuple[int, float]] = {}  # a new worker's info() -> (slot, since)
        self.inflight: dict[Any, tuple[int, str, Any]] = {}  # a run() -> (slot, shard, worker)
        self.pending: deque[str] = deque(shards)
        self.started = 0
        for slot in range(size):
            self._start(slot)

    def busy(self) -> bool:
        """Shards are running, or waiting for a worker that may still start."""
        return bool(self.inflight or (self.pending and self.starting))

    def collect(self, timeout: float) -> list[Outcome]:
        """Wait up to ``timeout`` s for something to finish; return every shard that has (the others
        already ready are taken too, without waiting), after giving their workers new shards."""
        refs = [*self.inflight, *self.starting]
        ready = self.backend.wait(refs, timeout) if refs else []
        if ready:
            taken = set(ready)
            ready += [r for r in self.backend.wait([r for r in refs if r not in taken], 0.0) if r not in taken]
        outcomes: list[Outcome] = []
        for ref in ready:
            if ref in self.starting:
                self._answered(ref)
            elif ref in self.inflight:
                outcome = self._finished(ref)
                if outcome is not None:
                    outcomes.append(outcome)
        self._give_up_slow_starters()
        return outcomes

    def shutdown(self) -> list[str]:
        """Stop every worker; returns the shards that were in flight."""
        for worker in self.workers:
            if worker is not None:
                self.backend.kill(worker)
        cut = [shard for _, shard, _ in self.inflight.values()]
        self.inflight.clear()
        return cut

    # -- internals ----------------------------------------------------------------------------------
    def _start(self, slot: int) -> None:
        """A (new) worker in ``slot``; it gets shards once it answers (so none waits on a worker that
        never starts)."""
        self.workers[slot] = self.backend.start()
        self.starting[self.backend.info(self.workers[slot])] = (slot, time.monotonic())

    def _submit(self, slot: int) -> None:
        worker = self.workers[slot]
        if self.pending and worker is not None:
            shard = self.pending.popleft()
            self.inflight[self.backend.run(worker, shard)] = (slot, shard, worker)

    def _answered(self, ref: Any) -> None:
        slot, _ = self.starting.pop(ref)
        try:
            info = self.backend.get(ref)
        except WorkerDiedError as exc:
            self.log(f"worker {slot} died while starting ({exc}); going on without it")
            self.workers[slot] = None
            return
        if info.get("error"):  # the worker caught its own start failure: its root cause, once
            raise WorkerStartError(f"a worker could not start: {info['error']}")
        self.started += 1
        self.on_start(info)
        for _ in range(PER_WORKER):
            self._submit(slot)

    def _finished(self, ref: Any) -> Outcome | None:
        slot, shard, worker = self.inflight.pop(ref)
        try:
            result = self.backend.get(ref)
        except WorkerDiedError as exc:
            if self.workers[slot] is worker:  # its other in-flight shard fails too: replace the worker once
                self.backend.kill(worker)
                self._start(slot)
            return Outcome(shard, None, f"worker died: {exc}", slot)
        except ShardFailedError as exc:
            outcome = Outcome(shard, None, str(exc), slot)
        else:
            outcome = Outcome(shard, result, None, slot)
        if self.workers[slot] is worker:
            self._submit(slot)
        return outcome

    def _give_up_slow_starters(self) -> None:
        for ref, (slot, since) in list(self.starting.items()):
            if time.monotonic() - since < self.start_timeout:
                continue
            del self.starting[ref]
            self.backend.kill(self.workers[slot])
            self.workers[slot] = None
            if self.started == 0 and not self.starting:
                raise WorkerStartError(self.no_worker())
            self.log(f"worker {slot} did not start within {self.start_timeout:g} s (waiting for resources?): going "
                     f"on with {sum(w is not None for w in self.workers)} worker(s)")
