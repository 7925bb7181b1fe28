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
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import urlparse

import ray

from unioncam import storage
from unioncam.data.sample import write_sample_shards
from unioncam.data.shards import MANIFEST, count_samples, expand_shards, shard_name
from unioncam.methods import NotApplicableError, applicable
from unioncam.models import LoadedModel, WeightsError, load
from unioncam.ops import resolve_precision
from unioncam.service.config import SAMPLE_DIR, ConfigError, EvalConfig, check_method_option_values, top_k
from unioncam.service.pool import ShardFailedError, ShardPool, WorkerDiedError, WorkerStartError
from unioncam.service.rundir import RunLock, RunManifest, check, load_manifest, source_changed
from unioncam.service.worker import ShardWorker

LOOPBACK = ("127.0.0.1", "localhost")


@ray.remote(num_cpus=0)
class _Progress:
    """Images done per shard in this run (set, not added, so a redone shard is not counted twice),
    and masked forwards per worker process (within-image progress)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.forwards: dict[int, tuple[int, int, int]] = {}

    def update(self, shard: str, n: int) -> None:
        self.done[shard] = n

    def update_forwards(self, worker: int, done: int, needed: int, images: int) -> None:
        self.forwards[worker] = (min(done, needed), needed, images)

    def total(self) -> tuple[int, int, int, float]:
        """Images done; masked forwards done and needed in the batches of images being explained now;
        and those batches' images weighted by their share of forwards done (the ETA's partial images)."""
        f = self.forwards.values()
        return (sum(self.done.values()), sum(d for d, _, _ in f), sum(n for _, n, _ in f),
                sum(i * d / n for d, n, i in f if n))


def log(message: str) -> None:
    """One line on stdout, flushed: what ``ray job logs`` shows."""
    print(f"[unioncam] {message}", flush=True)


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLine:
    """Driver-side progress over images and shards: ``done/total images, masked forwards done / needed
    in the batches of images being explained now, img/s, ETA``.

    ``needed`` is each batch's own count, known once its target layer ran
    (:meth:`unioncam.service.worker.ShardEvaluator.forwards_needed`: constant channels excluded), and
    the count restarts with each batch. A line is printed when something changed (images, shards,
    failures or the workers' masked forwards, which move within a long image) and at least
    ``interval`` seconds after the last one, or unchanged every ``6 × interval`` seconds as a
    heartbeat; a finished shard prints (at most one line a second). The rate is an exponential
    moving average of the rate between lines (weight :data:`ALPHA` on the newest), so the ETA does
    not jump with each image; the images still to do are counted less the share of the current
    batches already done, so the ETA moves within a long image too.
    """

    ALPHA = 0.3
    FORCED_GAP = 1.0  # seconds between lines forced by finished shards (thousands may finish a second)

    def __init__(self, total_images: int, total_shards: int, already: int, already_shards: int,
                 interval: float) -> None:
        self.total, self.shards, self.already, self.interval = total_images, total_shards, already, interval
        self.already_shards = already_shards
        self.start = self.last = self.last_sample = time.monotonic()
        self.shown: tuple[int, ...] = ()
        self.rate: float | None = None  # images/s, smoothed
        self.sampled = 0

    def show(self, done_now: int, shards_done: int, failed: int, force: bool = False, forwards: int = 0,
             needed: int = 0, partial: float = 0.0, final: bool = False) -> None:
        """``partial``: images of the batches being explained now, weighted by their share of masked
        forwards done, so the ETA moves between images; ``final``: the last state, printed unless it is
        the line already shown. Lines forced by finished shards come at most one a second."""
        now = time.monotonic()
        state = (done_now, shards_done, failed, forwards, needed)
        quiet = now - self.last < self.interval
        force = (final and state != self.shown) or (force and now - self.last >= self.FORCED_GAP)
        if not force and (quiet or (state == self.shown and now - self.last < 6 * self.interval)):
            return
        if done_now != self.sampled:  # a new rate sample: images since the last sample, over its time
            rate = (done_now - self.sampled) / max(now - self.last_sample, 1e-9)
            self.rate = rate if self.rate is None else self.ALPHA * rate + (1 - self.ALPHA) * self.rate
            self.sampled, self.last_sample = done_now, now
        self.last, self.shown = now, state
        done = self.already + done_now
        total = max(self.total, done)  # a shard its count could not read (not a tar) still yields records
        left = max(total - done - partial, 0.0)
        eta = _fmt_seconds(left / self.rate) if self.rate and done < total else "-"
        pct = 100.0 * done / total if total else 100.0
        rate = self.rate or 0.0
        speed = f"{rate:.2f} img/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/img"
        inner = f" | {min(forwards, needed)}/{needed} masked forwards of the current images" if needed else ""
        log(f"{done}/{total} images ({pct:.0f}%){inner} | {self.already_shards + shards_done}/{self.shards} "
            f"shards{f' | {failed} failed' if failed else ''} | {speed} | ETA {eta}")


def shard_counts(paths: list[str]) -> dict[str, int | None]:
    """Images per shard (the records a worker yields, error records included), from the shard set's
    ``manifest.json`` when present, else by reading the tar (:func:`unioncam.data.shards.count_samples`,
    streamed: for object stores without a manifest this reads every shard once more); None for a
    shard that cannot be read now."""
    listed: dict[str, int] = {}
    for folder in {storage.parent(p) for p in paths}:
        location = storage.join(folder, MANIFEST)
        try:
            if storage.is_file(location):
                for s in json.loads(storage.read_text(location)).get("shards", []):
                    listed[storage.join(folder, s["name"])] = int(s["count"])
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass
    out: dict[str, int | None] = {}
    for path in paths:
        if path in listed:
            out[path] = listed[path]
            continue
        try:
            out[path] = count_samples(path)  # the records the worker will yield, error records included
        except storage.StorageError:
            out[path] = None  # unreadable now: the worker tries (and fails, retryably) on its own
    return out


def connect(address: str | None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a fresh local Ray bound to 127.0.0.1.

    Without an address the job never joins another cluster on this host (``address="local"``: Ray
    would otherwise attach to any ``ray start --head`` it finds in its temp dir). Local and loopback
    clusters run in Ray's single-machine mode, in which every Ray server listens on 127.0.0.1 only
    (otherwise Ray 2.60 replaces 127.0.0.1 by the host's address and binds all interfaces).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _loopback_only()
        _ensure_token()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
        return
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    if host in LOOPBACK:
        _loopback_only()
        ray.init(address=address, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address)


def _loopback_only() -> None:
    """Ray's single-machine mode, for this process (read at Ray's import, so set here too) and the
    processes it starts."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _ensure_token() -> None:
    """Create ``~/.ray/auth_token`` (mode 0600) when token auth is on and no token exists yet;
    ``ray.init`` would create it readable by everyone."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    import secrets

    folder = os.path.join(os.path.expanduser("~"), ".ray")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(os.path.join(folder, "auth_token"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))


def cluster_ceiling() -> dict[str, float] | None:
    """The most resources an autoscaling cluster may grow to (from the autoscaler's node groups, as
    Ray records them in its GCS), or None for a fixed-size cluster."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: absent or changed means "not known to autoscale"
        return None
    return {str(k): float(v) for k, v in found.items()} if found else None


def plan_resources(cfg: EvalConfig, n_shards: int, resources: dict[str, float] | None = None,
                   ceiling: dict[str, float] | None = None) -> tuple[int, float, float]:
    """``(workers, gpus_per_worker, cpus_per_worker)`` from the config and the cluster's resources
    (``resources``: ``ray.cluster_resources()`` when None; ``ceiling``: what an autoscaling cluster
    may grow to, :func:`cluster_ceiling`).

    A pool the cluster cannot hold is never scheduled to wait forever: more workers than fit (in the
    ceiling, when the cluster autoscales) are shrunk to what fits, with a log line, and a single
    worker that cannot fit (``--gpus-per-worker 1`` without GPUs) is a :class:`ConfigError`. Workers
    that fit only once the autoscaler has added nodes are waited for up to ``cfg.start_timeout``.
    """
    res = ray.cluster_resources() if resources is None else resources
    limit = ceiling or res
    have_gpus, total_gpus, total_cpus = float(res.get("GPU", 0)), float(limit.get("GPU", 0)), float(limit.get("CPU", 1))
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if total_gpus >= 1 else 0.0)
    auto_workers = max(1, int(have_gpus // gpus)) if gpus > 0 else 1
    workers = cfg.workers if cfg.workers is not None else auto_workers
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    else:
        now_cpus = float(res.get("CPU", 1))
        cpus = min(4.0, max(1.0, now_cpus // workers)) if gpus > 0 else max(1.0, now_cpus // workers)
    workers = max(1, min(workers, n_shards))
    where = "the cluster can grow to" if ceiling else "the cluster has"
    if gpus > total_gpus or cpus > total_cpus:
        raise ConfigError(f"a worker asks for {gpus:g} GPU and {cpus:g} CPU but {where} {total_gpus:g} GPU "
                          f"and {total_cpus:g} CPU; lower --gpus-per-worker / --cpus-per-worker")
    fit = int(min(total_gpus // gpus if gpus > 0 else workers, total_cpus // cpus if cpus > 0 else workers))
    if workers > fit:
        log(f"{workers} workers × ({gpus:g} GPU, {cpus:g} CPU) exceed the {total_gpus:g} GPU / {total_cpus:g} CPU "
            f"{where}: running {fit}")
        workers = fit
    return workers, gpus, cpus


def prepare(cfg: EvalConfig) -> tuple[list[str], dict[str, int | None], dict[str, int | None]]:
    """Shard locations (building the sample when it is the target and missing), images per shard
    (None: unreadable now) and the images to take from each (None: all; with ``--limit``, the first
    ``limit`` images in shard order)."""
    if cfg.is_sample and not list(SAMPLE_DIR.glob(f"{cfg.dataset}/*.tar")):
        log(f"building the bundled sample shards under {SAMPLE_DIR}/")
        write_sample_shards(SAMPLE_DIR)
    try:
        paths = _rescored_shards(cfg.rescore) if cfg.rescore else [storage.absolute(p) for p in
                                                                   expand_shards(cfg.shards or "")]
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot list the shards: {exc}") from None
    names = [shard_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"shards from different folders share names {dupes[:3]}: outputs are named by shard")
    counts = shard_counts(paths)
    limits: dict[str, int | None] = dict.fromkeys(paths)
    if cfg.limit is not None:  # the first --limit images, in shard order
        left = cfg.limit
        for p in paths:
            known = counts[p]
            limits[p] = left if known is None else min(known, left)  # unknown: up to what is left
            left -= 0 if known is None else limits[p] or 0
    return paths, counts, limits


def check_model(cfg: EvalConfig) -> tuple[LoadedModel, EvalConfig]:
    """Build ``cfg``'s model here, in the driver, before the lock is taken and any worker starts, so
    missing, damaged or mismatched weights (and a model name the families refuse) are one line, not
    every worker's traceback; also refuses ``--target topk:K`` beyond the model's classes, and a method
    named in ``--methods`` that cannot explain the model. Returns the model and ``cfg`` less the methods
    that came in through ``all`` or a family and cannot explain it (logged)."""
    try:
        loaded = load(cfg.model or "vgg16", cfg.weights, allow_download=cfg.allow_download)
    except (WeightsError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    k = top_k(cfg.target)
    if k is not None and k > len(loaded.class_names):
        raise ConfigError(f"--target topk:{k} asks for more classes than {loaded.name} has "
                          f"({len(loaded.class_names)}): use K <= {len(loaded.class_names)}")
    if cfg.rescore:  # a rescore computes no map
        return loaded, cfg
    try:  # a method that cannot explain this model (CAM without a pooling + linear head, LeGrad on a CNN)
        methods, left_out = applicable(cfg.methods, loaded.model, loaded.target_layer, loaded.input_size,
                                       optional=cfg.methods_optional)
    except NotApplicableError as exc:  # names the method and the model
        raise ConfigError(f"{exc}; run the job without {exc.method} (--methods lists the others)") from None
    except Exception as exc:  # the check itself failed on this model: still one line, before Ray
        raise ConfigError(f"cannot check the methods on {loaded.name} ({type(exc).__name__}: {exc}); choose "
                          "other --methods") from None
    if left_out:
        log(f"leaving out {', '.join(left_out)} (from a group in --methods), which cannot explain {loaded.name}: "
            + "; ".join(left_out.values()))
    if not methods:
        raise ConfigError(f"no method of --methods can explain {loaded.name}: {'; '.join(left_out.values())}")
    options = {m: o for m, o in cfg.method_options.items() if m in methods}
    check_method_option_values(options, loaded.model)  # the values: the methods' own checks, on this model
    return loaded, replace(cfg, methods=methods, method_options=options)


def _rescored_shards(run_dir: str) -> list[str]:
    """The shards a rescore of ``run_dir`` reads: those its manifest lists as done (one whose rows are
    all errors has no maps: its rows are copied)."""
    manifest = load_manifest(run_dir)
    entries = manifest["shards"]
    planned = manifest.get("planned")  # the shards the run takes (its shard set less those beyond --limit)
    if not isinstance(planned, list):
        planned = list(manifest.get("shard_set") or {}) if isinstance(manifest.get("shard_set"), dict) else []
    skipped = {n: "not started" for n in planned if n not in entries}
    skipped.update({n: str(e["status"]) for n, e in entries.items() if e["status"] != "done"})
    if skipped:
        names = sorted(skipped)
        shown = ", ".join(f"{n} ({skipped[n]})" for n in names[:10]) + (f" and {len(names) - 10} more"
                                                                          if len(names) > 10 else "")
        log(f"rescore: skipping {len(names)} shard(s) not done in {storage.redact(run_dir)}: {shown}; rescore "
            "again once the run is complete, and this rescore's directory is extended with them")
    paths = []
    for name, entry in sorted(entries.items()):
        if entry["status"] != "done":
            continue
        uri = str((entry.get("source") or {}).get("uri") or entry.get("path") or "")
        if not uri or "***" in uri:
            raise ConfigError(f"{storage.redact(run_dir)} recorded shard {name} without a readable location "
                              f"({uri or 'none'}); rescore needs the shard's images")
        paths.append(uri)
    if not paths:
        raise ConfigError(f"{storage.redact(run_dir)} has no finished shard to rescore")
    return paths


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every shard of ``cfg`` (resolved) on Ray; returns the run manifest.

    ``cfg.out`` and the shards may be local paths or URIs (``s3://...``); relative local paths are
    made absolute before anything is sent to workers (other cwd, other node).

    Raises:
        ConfigError: bad options, no shards, ``out`` holding a run with other settings, or another
            driver running on ``out``.
        WorkerStartError: workers cannot start (bad weights, unknown layer...).
    """
    out = storage.absolute(cfg.out or ".")
    if not storage.is_uri(out) and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a run directory")
    weights = storage.absolute(cfg.weights) if cfg.weights else None
    cfg = replace(cfg, out=out, weights=weights)
    paths, counts, limits = prepare(cfg)
    loaded, cfg = check_model(cfg)  # before the lock and any worker: bad weights are one line
    sha = loaded.weights_sha256 if weights else None
    del loaded
    if cfg.rescore:
        then = load_manifest(cfg.rescore)["config"].get("weights_sha256")
        if then != sha:
            raise ConfigError(f"{storage.redact(cfg.rescore)} was computed with weights sha256 {str(then)[:12]}, "
                              f"this rescore loads {str(sha)[:12]} (--weights): the maps would not be this model's")
    lock = RunLock(out)
    lock.acquire()
    try:
        return _run_locked(cfg, out, paths, counts, limits, sha, lock)
    finally:
        lock.release()


def _run_locked(cfg: EvalConfig, out: str, paths: list[str], counts: dict[str, int | None],
                limits: dict[str, int | None], sha: str | None, lock: RunLock) -> dict[str, Any]:
    shown = storage.redact(out)
    manifest = RunManifest(out, {**cfg.identity(), "weights_sha256": sha})
    manifest.check_shard_set({shard_name(p): storage.redact(p) for p in paths}, grow=bool(cfg.rescore))
    rescored = _rescored_files(cfg)
    todo, done = resume_plan(manifest, out, paths, limits, cfg.save_maps, rescored)
    lock.heartbeat()
    changed = changed_sources(manifest, done, lock)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"{changed[0]}{more}: its rows describe other data. Use a new --out, or delete "
                          f"{shown}/metrics/<shard>.parquet of each changed shard to recompute it here")
    wanted = {p: (limits[p] if limits[p] is not None else counts[p]) or 0 for p in paths}
    paths = [p for p in paths if limits[p] != 0]  # beyond --limit: not part of this command
    manifest.data["planned"] = sorted(shard_name(p) for p in paths)  # what a finished run has done (verify)
    total = sum(wanted[p] for p in paths)
    already = sum(wanted[p] for p in done)
    unknown = sum(counts[p] is None for p in paths)
    unreadable = f", {unknown} shard(s) unreadable now" if unknown else ""
    log(f"run {manifest.run_id}: {len(paths)} shards ({total} images{unreadable}), {len(done)} already done; "
        f"model {cfg.model}, methods {', '.join(cfg.methods)}, metrics {', '.join(cfg.metrics)}, "
        f"precision {cfg.precision}; out {shown}")
    manifest.save()
    if todo:
        connect(cfg.address)
        extra = {n: {"rescored_files": files} for n, files in rescored.items()} if rescored is not None else None
        _schedule(cfg, manifest, todo, limits, counts, lock,
                  ProgressLine(total, len(paths), already, len(done), cfg.progress_interval), extra)
    if not storage.is_uri(out):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out, "running"))  # only when empty: a marker left means a worker was killed
    ours = {shard_name(p) for p in paths}
    entries = {n: e for n, e in manifest.data["shards"].items() if n in ours}
    finished = [e for e in entries.values() if e["status"] == "done"]
    failed = sorted(n for n, e in entries.items() if e["status"] == "failed")
    manifest.data["last_command"] = {"shards": len(paths), "done": len(finished), "failed": failed}
    manifest.save()
    log(f"done: {len(finished)}/{len(paths)} shards, {sum(e.get('images', 0) for e in finished)} images, "
        f"{sum(e.get('errors', 0) for e in finished)} error rows"
        + (f"; FAILED shards {failed} (rerun the same command to retry them)" if failed else ""))
    if cfg.report:
        from unioncam.service.report import write_report

        try:
            paths_out = write_report(out, overlays=cfg.overlays)
            log(f"report: {storage.redact(paths_out['html'])}")
        except Exception as exc:  # the rows are safe; the report can be redone with `unioncam report`
            log(f"report failed ({type(exc).__name__}: {exc}); rerun `unioncam report {shown}`")
            manifest.data["last_command"]["report"] = f"failed: {type(exc).__name__}: {exc}"[:500]
            manifest.save()
    return manifest.data


def resume_plan(manifest: RunManifest, out: str, paths: list[str], limits: dict[str, int | None], save_maps: bool,
                rescored: dict[str, dict[str, str]] | None = None) -> tuple[list[str], list[str]]:
    """``(todo, done)``: the shards of ``paths`` (those with images to take: ``limits`` not 0) to
    (re)do and those finished (:func:`unioncam.service.rundir.check`, each redo logged with its
    reason). For a rescore, ``rescored`` holds the rescored run's file hashes per shard: a rescored
    shard whose run redid it since is redone too."""
    names = [shard_name(p) for p in paths if limits[p] != 0]
    checked = check(out, manifest.data, names, save_maps)
    todo, done = [], []
    for p in paths:
        name = shard_name(p)
        if limits[p] == 0:
            continue
        why = checked[name]
        entry = manifest.data["shards"].get(name, {})
        if why is None and rescored is not None and entry.get("rescored_files") != rescored.get(name):
            why = "the rescored run redid this shard since it was rescored"
        if why is None:
            done.append(p)
            continue
        todo.append(p)
        if entry.get("status") == "done":
            log(f"redoing {name}: {why}")
    return todo, done


def _rescored_files(cfg: EvalConfig) -> dict[str, dict[str, str]] | None:
    """For a rescore: the sha256 of each done shard's metrics and maps files in the rescored run (what
    this rescore's rows were computed from), by shard; None otherwise."""
    if not cfg.rescore:
        return None
    shards = load_manifest(cfg.rescore)["shards"]
    return {name: {folder: str(rec.get("sha256")) for folder, rec in (entry.get("files") or {}).items()
                   if folder in ("metrics", "maps") and isinstance(rec, dict)}
            for name, entry in shards.items() if entry.get("status") == "done"}


def changed_sources(manifest: RunManifest, done: list[str], lock: RunLock) -> list[str]:
    """What changed in the sources of the shards ``done``: each source folder is listed once and a
    source whose stamp is the one recorded is not read; the others are hashed on a few threads
    (local shards are read once more, object-store shards cost one HEAD each). A source that cannot
    be read now keeps its rows (a log line)."""
    from concurrent.futures import ThreadPoolExecutor

    if not done:
        return []
    start = time.monotonic()
    listed: dict[str, str | None] = {}
    for folder in sorted({storage.parent(p) for p in done}):
        with contextlib.suppress(storage.StorageError):  # then each source is checked on its own
            listed.update(storage.list_stamps(folder))

    def changed(path: str) -> str | None:
        name = shard_name(path)
        try:
            return source_changed(name, manifest.data["shards"][name], path, listed=listed)
        except storage.StorageError as exc:
            log(f"cannot check the source of {name} now ({exc}); keeping its rows")
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = []
        for why in pool.map(changed, done):
            lock.heartbeat()
            if why is not None:
                found.append(why)
    if time.monotonic() - start > 10:
        log(f"checked the sources of {len(done)} done shards in {_fmt_seconds(time.monotonic() - start)}")
    return found


class _RayBackend:
    """The pool's workers as Ray actors (:class:`unioncam.service.worker.ShardWorker`), Ray's errors
    turned into the pool's (:class:`WorkerStartError`, :class:`WorkerDiedError`, :class:`ShardFailedError`)
    with their root cause on one line."""

    def __init__(self, actor_cls: Any, args: tuple[Any, ...], limits: dict[str, int | None],
                 counts: dict[str, int | None]) -> None:
        self.actor_cls, self.args, self.limits, self.counts = actor_cls, args, limits, counts

    def start(self) -> Any:
        return self.actor_cls.remote(*self.args)

    def info(self, worker: Any) -> Any:
        return worker.info.remote()

    def run(self, worker: Any, shard: str) -> Any:
        return worker.run.remote(shard, self.limits[shard], self.counts.get(shard))

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        ready, _ = ray.wait(refs, num_returns=1 if timeout > 0 else len(refs), timeout=timeout)
        return list(ready)

    def get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise WorkerStartError(f"a worker could not start: {_reason(exc)}") from None
            raise WorkerDiedError(_reason(exc)) from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, WorkerStartError):  # a restarted worker that could not start again
                raise WorkerStartError(str(cause)) from None
            raise ShardFailedError(_reason(exc)) from None

    def kill(self, worker: Any) -> None:
        ray.kill(worker, no_restart=True)


def drive(pool: ShardPool, manifest: RunManifest, lock: RunLock, line: ProgressLine,
          progress: Callable[[], tuple[int, int, int, float]], forget: Callable[[str], None], interval: float,
          extra: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """The driver's loop: record each shard the pool finishes (its own small record,
    :meth:`RunManifest.record`), show progress, keep the lock; returns the counts done/failed.
    ``progress()`` gives (images done, masked forwards done, needed, partial images); ``forget(name)``
    drops a failed shard's images from it; ``extra[name]`` is added to a done shard's record."""
    tally = {"done": 0, "failed": 0}
    graph_count: dict[int, int] = {}
    while pool.busy():
        finished = pool.collect(min(interval, 5.0))
        for outcome in finished:
            name = shard_name(outcome.shard)
            path = storage.redact(outcome.shard)
            if outcome.result is None:
                manifest.record(name, status="failed", path=path, error=outcome.error)
                forget(name)
                tally["failed"] += 1
                continue
            result = dict(outcome.result)
            graphs = result.pop("compiled_graphs", 0)
            if graphs > graph_count.setdefault(outcome.slot, graphs):
                log(f"warning: worker {outcome.slot} recompiled during {name} ({graphs} graphs)")
            manifest.record(name, status="done", path=path, **result, **(extra or {}).get(name, {}))
            tally["done"] += 1
        images, forwards, needed, partial = progress()
        line.show(images, tally["done"], tally["failed"], force=bool(finished), forwards=forwards, needed=needed,
                  partial=partial)
        lock.heartbeat()
    for shard in pool.pending:  # every worker is gone: these shards stay for a rerun
        manifest.record(shard_name(shard), status="failed", path=storage.redact(shard),
                        error="no worker was left to run it")
        tally["failed"] += 1
    images, _, _, _ = progress()
    line.show(images, tally["done"], tally["failed"], final=True)  # the finished state, whatever the last line was
    return tally


def _schedule(cfg: EvalConfig, manifest: RunManifest, todo: list[str], limits: dict[str, int | None],
              counts: dict[str, int | None], lock: RunLock, line: ProgressLine,
              extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Run ``todo`` on a pool of Ray workers (:func:`drive`); ``extra[name]`` is added to a done
    shard's record (a rescore's ``rescored_files``)."""
    workers, gpus, cpus = plan_resources(cfg, len(todo), ceiling=cluster_ceiling())
    precision = resolve_precision(cfg.precision, "cuda" if gpus > 0 else "cpu")
    recorded = manifest.data.setdefault("precision", precision)
    if recorded != precision:
        raise ConfigError(f"the rows in {storage.redact(cfg.out or '')} were computed in {recorded}, but "
                          f"--precision {cfg.precision} means {precision} on these workers; pass --precision "
                          f"{recorded} or use a new --out")
    cfg = replace(cfg, precision=precision)
    log(f"{workers} worker(s), each {gpus:g} GPU and {cpus:g} CPU; methods' masked forwards in {precision}")
    if gpus > 0 and precision == "fp32":
        log("fp32 on GPUs is IEEE fp32 (TF32 off); the default (auto = fp16) is faster (its effect on Average "
            "Drop: docs/performance.md)")
    actor_cls = ray.remote(ShardWorker).options(num_gpus=gpus, num_cpus=cpus, max_restarts=cfg.max_restarts,
                                                 max_task_retries=cfg.max_task_retries, max_concurrency=2)
    progress_name = f"unioncam-progress-{manifest.run_id}-{os.getpid()}"
    progress = _Progress.options(name=progress_name).remote()  # type: ignore[attr-defined]
    manifest.data["workers"] = []  # the workers of this command, as each starts (info(): pid, host, GPUs)

    def no_worker() -> str:
        return (f"no worker started within {cfg.start_timeout:g} s: each asks for {gpus:g} GPU and {cpus:g} CPU, "
                f"and the cluster has {_free()} free; raise --start-timeout (an autoscaler adding nodes) or ask "
                "for less per worker")

    backend = _RayBackend(actor_cls, (cfg, manifest.run_id, progress_name), limits, counts)
    pool = ShardPool(backend, workers, todo, cfg.start_timeout, on_start=manifest.data["workers"].append,
                     no_worker=no_worker, log=log)
    try:
        drive(pool, manifest, lock, line, lambda: ray.get(progress.total.remote()),
              lambda name: progress.update.remote(name, 0), cfg.progress_interval, extra)
    finally:
        for shard in pool.shutdown():  # shards cut short (Ctrl-C, an error): no worker holds them now
            with contextlib.suppress(OSError):
                storage.delete(storage.join(cfg.out or ".", "running", f"{shard_name(shard)}.json"))
        ray.kill(progress)


def _free() -> str:
    free = ray.available_resources()
    return f"{free.get('GPU', 0):g} GPU and {free.get('CPU', 0):g} CPU"


def _reason(exc: BaseException) -> str:
    """The root cause of a Ray error, on one line: its ``cause`` when Ray kept one, else the last
    ``SomeError: message`` line of the traceback text Ray baked into the message (an actor whose
    creation task failed), without Ray's colour codes and frames."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()
        text = " ".join(lines)
        for i in range(len(lines) - 1, -1, -1):
            found = re.match(r"^(?:\w+\.)*(\w+(?:Error|Exception|Exit)): ?(.*)$", lines[i].strip())
            if found:
                text = " ".join([f"{found.group(1)}: {found.group(2)}", *lines[i + 1:]])
                break
    return re.sub(r"\s+", " ", text).strip()


def main(cfg: EvalConfig) -> int:
    """Run the job of a resolved config (``unioncam eval`` / ``jobs/eval_<dataset>.py`` and ``unioncam
    rescore`` parse their flags once, :meth:`EvalConfig.from_args`, then call this): exit 0 when every
    shard is done and reported, 1 when some failed or the report failed (rerun to retry), 2 on bad
    options, 130 on Ctrl-C."""
    try:
        shown = {k: storage.redact(v) if isinstance(v, str) else v for k, v in asdict(cfg).items()
                 if v is not None and v != {} and k != "methods_optional"}  # what was set (not the derived list)
        log(f"config: {json.dumps(shown, sort_keys=True)}")
        manifest = run(cfg)
    except (ConfigError, WorkerStartError, ValueError, OSError) as exc:
        print(f"unioncam: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        done = ""
        with contextlib.suppress(Exception):  # what is done, when the manifest can be read
            counts = load_manifest(storage.absolute(cfg.out or "."))["counts"]
            done = f" with {counts['shards_done']} shards ({counts['images']} images) done"
        print(f"unioncam: interrupted{done}; finished shards are kept (manifest.json): rerun the same command "
              "to resume", file=sys.stderr, flush=True)
        return 130
    return 1 if manifest["last_command"]["failed"] or manifest["last_command"].get("report") else 0
