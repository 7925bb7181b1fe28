"""The driver: schedule one task per shard on a pool of Ray actors, keep the run manifest.

Scheduling is pull-based: every actor gets one shard at a time and the next one when it returns,
so fast workers take more shards. A worker process that dies is restarted by Ray
(``max_restarts``) and its shard retried (``max_task_retries``); a shard whose retries run out is
recorded as failed and the job goes on. ``RUN_DIR/manifest.json`` lists shards done and failed;
a rerun with the same ``--out`` skips done shards (their Parquet files exist) and redoes the rest.
Each shard's files are replaced atomically, so a redone shard never duplicates rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tarfile
import time
import uuid
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray

from unioncam.data.sample import write_sample_shards
from unioncam.data.shards import IMAGE_EXTS, MANIFEST, expand_shards
from unioncam.models import sha256_file
from unioncam.service.config import SAMPLE_DIR, ConfigError, EvalConfig
from unioncam.service.results import write_text_atomic
from unioncam.service.worker import ShardWorker, shard_name

RUN_FORMAT = "unioncam-run/1"
LOOPBACK = ("127.0.0.1", "localhost")


class WorkerStartError(RuntimeError):
    """A worker could not start (e.g. bad weights): every shard would fail the same way."""


@ray.remote(num_cpus=0)
class _Progress:
    """Images done per shard in this run (set, not added, so a redone shard is not counted twice)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def update(self, shard: str, n: int) -> None:
        self.done[shard] = n

    def total(self) -> int:
        return sum(self.done.values())


def log(message: str) -> None:
    """One line on stdout, flushed: what ``ray job logs`` shows."""
    print(f"[unioncam] {message}", flush=True)


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLine:
    """Driver-side progress over images and shards: ``done/total images, img/s, ETA``."""

    def __init__(self, total_images: int, total_shards: int, already: int, interval: float) -> None:
        self.total, self.shards, self.already, self.interval = total_images, total_shards, already, interval
        self.start = time.monotonic()
        self.last = 0.0

    def show(self, done_now: int, shards_done: int, failed: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        done = self.already + done_now
        rate = done_now / max(now - self.start, 1e-9)
        eta = _fmt_seconds((self.total - done) / rate) if rate > 0 and done < self.total else "-"
        pct = 100.0 * done / self.total if self.total else 100.0
        speed = f"{rate:.2f} img/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/img"
        log(f"{done}/{self.total} images ({pct:.0f}%) | {shards_done}/{self.shards} shards"
            f"{f' | {failed} failed' if failed else ''} | {speed} | ETA {eta}")


def shard_counts(paths: list[str]) -> dict[str, int]:
    """Images per shard, from the shard set's ``manifest.json`` when present, else the tar headers."""
    listed: dict[str, int] = {}
    for folder in {Path(p).parent for p in paths}:
        if (folder / MANIFEST).is_file():
            try:
                for s in json.loads((folder / MANIFEST).read_text()).get("shards", []):
                    listed[str(folder / s["name"])] = int(s["count"])
            except (ValueError, KeyError, TypeError):
                pass
    out = {}
    for path in paths:
        if path in listed:
            out[path] = listed[path]
            continue
        try:
            with tarfile.open(path, "r:") as tar:
                keys = {m.name.split("/")[-1].partition(".")[0] for m in tar
                        if m.name.rpartition(".")[2].lower() in IMAGE_EXTS}
            out[path] = len(keys)
        except (tarfile.TarError, OSError):
            out[path] = 0  # damaged; the worker reports what it can read
    return out


class RunManifest:
    """``RUN_DIR/manifest.json``: config identity, provenance, and each shard's status."""

    def __init__(self, out: Path, identity: dict[str, Any]) -> None:
        self.path = out / "manifest.json"
        self.data: dict[str, Any]
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("config") != identity:
                old, new = self.data.get("config", {}), identity
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
                raise ConfigError(f"{out} holds a run with other settings ({diff}); use a new --out")
        else:
            self.data = {"format": RUN_FORMAT, "run_id": uuid.uuid4().hex[:12],
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": identity, "shards": {}}

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    def is_done(self, name: str, out: Path) -> bool:
        entry = self.data["shards"].get(name, {})
        return entry.get("status") == "done" and (out / "metrics" / f"{name}.parquet").is_file()

    def record(self, name: str, **entry: Any) -> None:
        previous = self.data["shards"].get(name, {})
        entry["attempts"] = int(previous.get("attempts", 0)) + 1
        self.data["shards"][name] = entry
        self.save()

    def save(self) -> None:
        shards = self.data["shards"].values()
        self.data["counts"] = {
            "shards_done": sum(s["status"] == "done" for s in shards),
            "shards_failed": sum(s["status"] == "failed" for s in shards),
            "images": sum(s.get("images", 0) for s in shards if s["status"] == "done"),
            "error_rows": sum(s.get("errors", 0) for s in shards if s["status"] == "done")}
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


def connect(address: str | None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local cluster bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
        return
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    extra = {"_node_ip_address": "127.0.0.1"} if host in LOOPBACK else {}
    ray.init(address=address, **extra)


def plan_resources(cfg: EvalConfig, n_shards: int) -> tuple[int, float, float]:
    """``(workers, gpus_per_worker, cpus_per_worker)`` from the config and the cluster's resources."""
    res = ray.cluster_resources()
    total_gpus, total_cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if total_gpus >= 1 else 0.0)
    auto_workers = max(1, int(total_gpus // gpus)) if gpus > 0 else 1
    workers = cfg.workers if cfg.workers is not None else auto_workers
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    else:
        cpus = min(4.0, max(1.0, total_cpus // workers)) if gpus > 0 else max(1.0, total_cpus // workers)
    workers = max(1, min(workers, n_shards))
    if gpus * workers > total_gpus or cpus * workers > total_cpus:
        log(f"warning: {workers} workers × ({gpus:g} GPU, {cpus:g} CPU) exceed the cluster's "
            f"{total_gpus:g} GPU / {total_cpus:g} CPU; the extra workers wait for resources")
    return workers, gpus, cpus


def prepare(cfg: EvalConfig) -> tuple[list[str], dict[str, int]]:
    """Shard paths (building the sample when it is the target and missing) and images per shard."""
    if cfg.is_sample and not list(SAMPLE_DIR.glob(f"{cfg.dataset}/*.tar")):
        log(f"building the bundled sample shards under {SAMPLE_DIR}/")
        write_sample_shards(SAMPLE_DIR)
    try:
        paths = expand_shards(cfg.shards or "")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    names = [shard_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"shards from different folders share names {dupes[:3]}: outputs are named by shard")
    counts = shard_counts(paths)
    if cfg.limit is not None:
        left = cfg.limit
        for p in paths:
            counts[p], left = min(counts[p], left), left - min(counts[p], left)
    return paths, counts


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every shard of ``cfg`` (resolved) on Ray; returns the run manifest.

    Raises:
        ConfigError: bad options, no shards, or ``out`` holding a run with other settings.
        WorkerStartError: workers cannot start (bad weights, unknown layer...).
    """
    out = Path(cfg.out or ".").absolute()
    cfg = replace(cfg, out=str(out))  # workers may run elsewhere (other cwd, other node)
    paths, counts = prepare(cfg)
    paths = [os.path.abspath(p) for p in paths]
    counts = {os.path.abspath(p): n for p, n in counts.items()}
    sha = sha256_file(cfg.weights) if cfg.weights else None
    manifest = RunManifest(out, {**cfg.identity(), "weights_sha256": sha})
    limits = {p: (counts[p] if cfg.limit is not None else None) for p in paths}
    todo = [p for p in paths if not manifest.is_done(shard_name(p), out) and limits[p] != 0]
    skipped = len(paths) - len(todo)
    total = sum(counts.values())
    already = sum(counts[p] for p in paths if p not in todo)
    log(f"run {manifest.run_id}: {len(paths)} shards ({total} images), {skipped} already done; "
        f"model {cfg.model}, methods {', '.join(cfg.methods)}, metrics {', '.join(cfg.metrics)}, "
        f"precision {cfg.precision}; out {out}")
    manifest.save()
    if todo:
        connect(cfg.address)
        _schedule(cfg, manifest, todo, limits, ProgressLine(total, len(paths), already, cfg.progress_interval))
    with contextlib.suppress(OSError):
        (out / "running").rmdir()  # only when empty: a marker left means a worker was killed mid-shard
    failed = sorted(n for n, s in manifest.data["shards"].items() if s["status"] == "failed")
    log(f"done: {manifest.data['counts']['shards_done']}/{len(paths)} shards, {manifest.data['counts']['images']} "
        f"images, {manifest.data['counts']['error_rows']} error rows"
        + (f"; FAILED shards {failed} (rerun the same command to retry them)" if failed else ""))
    if cfg.report:
        from unioncam.service.report import write_report

        try:
            paths_out = write_report(out, overlays=cfg.overlays)
            log(f"report: {paths_out['html']}")
        except Exception as exc:  # the rows are safe on disk; the report can be redone with `unioncam report`
            log(f"report failed ({type(exc).__name__}: {exc}); rerun `unioncam report {out}`")
    return manifest.data


def _schedule(cfg: EvalConfig, manifest: RunManifest, todo: list[str], limits: dict[str, int | None],
              line: ProgressLine) -> None:
    workers, gpus, cpus = plan_resources(cfg, len(todo))
    log(f"{workers} worker(s), each {gpus:g} GPU and {cpus:g} CPU")
    if gpus > 0 and cfg.precision == "fp32":
        log("fp32 on GPUs is IEEE fp32 (TF32 off); --precision fp16 is faster (its effect on Average Drop: "
            "README, Performance)")
    actor_cls = ray.remote(ShardWorker).options(num_gpus=gpus, num_cpus=cpus, max_restarts=cfg.max_restarts,
                                                 max_task_retries=cfg.max_task_retries)
    progress_name = f"unioncam-progress-{manifest.run_id}-{os.getpid()}"
    progress = _Progress.options(name=progress_name).remote()  # type: ignore[attr-defined]
    actors = [actor_cls.remote(cfg, manifest.run_id, progress_name) for _ in range(workers)]
    pending = deque(todo)
    inflight: dict[ray.ObjectRef, tuple[int, str]] = {}

    def submit(i: int) -> None:
        if pending:
            path = pending.popleft()
            inflight[actors[i].run.remote(path, limits[path])] = (i, path)

    for i in range(workers):
        submit(i)
    counts = {"done": 0, "failed": 0}
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=min(cfg.progress_interval, 5.0))
            for ref in ready:
                i, path = inflight.pop(ref)
                name = shard_name(path)
                try:
                    result = ray.get(ref)
                    manifest.record(name, status="done", path=path, **result)
                    counts["done"] += 1
                except ray.exceptions.RayActorError as exc:
                    if "creation task" in str(exc):
                        raise WorkerStartError(f"a worker could not start: {_reason(exc)}") from None
                    manifest.record(name, status="failed", path=path, error=f"worker died: {_reason(exc)}")
                    counts["failed"] += 1
                    ray.kill(actors[i], no_restart=True)
                    actors[i] = actor_cls.remote(cfg, manifest.run_id, progress_name)
                except ray.exceptions.RayTaskError as exc:
                    manifest.record(name, status="failed", path=path, error=_reason(exc))
                    counts["failed"] += 1
                submit(i)
            line.show(ray.get(progress.total.remote()), counts["done"], counts["failed"], force=bool(ready))
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        ray.kill(progress)


def _reason(exc: BaseException) -> str:
    """The root cause of a Ray error, on one line."""
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(exc)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:500]


def main(argv: list[str] | None, dataset: str) -> int:
    """Entry point of ``jobs/eval_<dataset>.py``: exit 0 when every shard is done, 1 when some
    failed (rerun to retry), 2 on bad options."""
    try:
        cfg = EvalConfig.from_argv(argv, dataset)  # type: ignore[arg-type]
        log(f"config: {json.dumps({k: v for k, v in asdict(cfg).items() if v is not None}, sort_keys=True)}")
        manifest = run(cfg)
    except (ConfigError, WorkerStartError, ValueError) as exc:
        print(f"unioncam: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 1 if manifest["counts"]["shards_failed"] else 0
