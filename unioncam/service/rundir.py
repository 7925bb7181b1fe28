"""The run directory (``RUN_DIR``, the job's ``--out``) as one object: its layout, its manifest, its
lock, and the one answer to "is this shard done?" that resume, ``unioncam verify``, the report and
the readers share (:meth:`RunDir.check`).

Layout::

    manifest.json               the summary: run id, settings, shard set, every shard's entry as of
                                its last save, counts
    shards/<shard>.<attempt>.json  each shard's record, one per attempt: the truth
    metrics/<shard>.parquet     rows (unioncam.service.results)
    maps/<shard>.parquet        maps
    sanity/<shard>.parquet      with --sanity
    running/<shard>.json        while a worker has the shard
    lock.json                   while a driver runs (at most one)
    report/, rescore/<protocol>/

Cost at scale: recording a finished shard writes its own small record (O(1) per completion, the
same at 50 or 50,000 shards); the summary is rewritten at most every :data:`SUMMARY_INTERVAL`
seconds (or 20 × its own write time, when that is longer) and when the command ends. After a crash
the records are the truth: a reader takes the summary and fetches only the records of attempts the
summary does not have (one listing of ``shards/`` says which: a record's name carries its
attempt). Checking done shards lists each output folder once and compares every file's stamp (size
and modification time) with the one recorded when it was written; a file is opened (footer) and
hashed only when its stamp moved (or ``deep``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unioncam import storage
from unioncam.data.shards import shard_name
from unioncam.service.config import ConfigError
from unioncam.service.results import (
    SANITY_SCHEMA,
    RunFileError,
    maps_schema,
    metrics_schema,
    optional_columns,
    schema_version_problem,
)

RUN_FORMAT = "unioncam-run/1"
FOLDERS = ("metrics", "maps", "sanity")
SUMMARY_INTERVAL = 5.0  # seconds between summary rewrites (at least; see RunManifest.record)
RECORD_WRITERS = 8  # threads writing shard records to an object store
LOCK_HEARTBEAT = 30.0
LOCK_STALE = 300.0


def log(message: str) -> None:
    print(f"[unioncam] {message}", flush=True)


class RunDir:
    """Paths of a run directory (local or a URI)."""

    def __init__(self, root: str) -> None:
        self.root = root

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "manifest.json")

    @property
    def lock(self) -> str:
        return storage.join(self.root, "lock.json")

    def output(self, folder: str, name: str) -> str:
        """``<root>/<folder>/<name>.parquet`` (folder: metrics, maps or sanity)."""
        return storage.join(self.root, folder, f"{name}.parquet")

    def record(self, name: str, attempt: int) -> str:
        """The record of shard ``name``'s ``attempt``-th attempt (1, 2, ...)."""
        return storage.join(self.root, "shards", f"{name}.{attempt}.json")

    def running(self, name: str) -> str:
        return storage.join(self.root, "running", f"{name}.json")


# -- the manifest -------------------------------------------------------------------------------------
def load_manifest(run_dir: str) -> dict[str, Any]:
    """``RUN_DIR``'s manifest: the summary ``manifest.json`` with the shard records written since its
    last save merged in (so it is complete after a crash), checked for the fields every reader
    relies on.

    Raises:
        FileNotFoundError: no ``manifest.json``.
        ValueError: the summary is not JSON or lacks/garbles ``run_id``, ``config`` or ``shards``, or
            a record is malformed (the message names the file and the field).
    """
    where = RunDir(run_dir)
    shown = storage.redact(where.manifest)
    try:
        data = json.loads(storage.read_text(where.manifest))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{shown} is not valid JSON ({exc}); restore it or use a new --out") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shown} is not a run manifest (a JSON {type(data).__name__})")
    if str(data.get("format", "")).startswith("unioncam-shards"):
        raise ValueError(f"{storage.redact(run_dir)} is a shard folder (its manifest.json lists shards), not a run "
                         "directory: choose another --out")
    for key, kind in (("run_id", str), ("config", dict), ("shards", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{shown}: '{key}' is missing or not a {kind.__name__}; restore it or use a new --out")
    latest: dict[str, tuple[int, str]] = {}  # shard -> its last attempt's record
    for path in storage.list_files(storage.join(run_dir, "shards"), ".json"):
        name, _, number = storage.basename(path).removesuffix(".json").rpartition(".")
        if name and number.isdigit() and int(number) > latest.get(name, (0, ""))[0]:
            latest[name] = (int(number), path)
    for name, (attempt, path) in latest.items():
        known = data["shards"].get(name)
        if isinstance(known, dict) and isinstance(known.get("attempts"), int) and known["attempts"] >= attempt:
            continue  # the summary has this attempt
        try:
            entry = json.loads(storage.read_text(path))
        except FileNotFoundError:
            continue
        except json.JSONDecodeError as exc:
            raise ValueError(f"{storage.redact(path)} is not valid JSON ({exc}); delete it to redo shard {name}") \
                from None
        if isinstance(entry, dict) and entry.get("run_id", data["run_id"]) == data["run_id"]:
            entry.pop("run_id", None)
            data["shards"][name] = entry
    for name, entry in data["shards"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str) or not all(
                isinstance(entry.get(k, 0), int) and not isinstance(entry.get(k, 0), bool)
                for k in ("images", "rows", "maps", "errors", "attempts")):
            raise ValueError(f"{shown}: the entry of shard {name!r} is malformed; restore it or use a new --out")
    return data


class RunManifest:
    """The driver's view of ``RUN_DIR``'s manifest: config identity, provenance, each shard's status.

    Only the driver writes it: :meth:`record` writes the shard's own record (O(1)) and rewrites the
    summary only now and then; :meth:`save` rewrites it now.
    """

    def __init__(self, out: str, identity: dict[str, Any]) -> None:
        self.out = out
        self.dir = RunDir(out)
        self.data: dict[str, Any]
        self.last_save = 0.0
        self.save_cost = 0.0
        self._writes: list[Future[None]] = []  # record PUTs in flight (object stores: their latency overlaps)
        self._writer: ThreadPoolExecutor | None = None
        if storage.is_file(self.dir.manifest):
            self.data = load_manifest(out)
            if self.data.get("config") != identity:
                old, new = self.data.get("config", {}), identity
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
                if any(s.get("status") == "done" for s in self.data["shards"].values()):
                    raise ConfigError(f"{storage.redact(out)} holds a run with other settings ({diff}); "
                                      "use a new --out")
                log(f"no shard of {storage.redact(out)} is done yet: taking the new settings ({diff})")
                self.data["config"] = identity
        else:
            self.data = {"format": RUN_FORMAT, "run_id": uuid.uuid4().hex[:12],
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": identity, "shards": {}}

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    def check_done(self, name: str, save_maps: bool) -> str | None:
        """None when shard ``name`` is finished (:func:`check`), else why it must be (re)done."""
        return check(self.out, self.data, [name], save_maps)[name]

    def check_shard_set(self, current: dict[str, str], grow: bool = False) -> None:
        """A run directory holds one shard set (name → URI without credentials): the first command
        records it; a later one that names other shards, or the same names elsewhere, is refused once
        any shard is done (before that, the new set is taken). With ``grow`` (a rescore, whose shard
        set is the rescored run's done shards, growing as that run is completed) a set that only adds
        shards is taken."""
        recorded = self.data.get("shard_set")
        done = any(e.get("status") == "done" for e in self.data["shards"].values())
        grows = grow and isinstance(recorded, dict) and all(current.get(n) == u for n, u in recorded.items())
        if isinstance(recorded, dict) and recorded != current and done and not grows:
            new = sorted(set(current) - set(recorded))
            missing = sorted(set(recorded) - set(current))
            moved = sorted(n for n in current if n in recorded and recorded[n] != current[n])
            example = (f"{moved[0]} was {recorded[moved[0]]}, now {current[moved[0]]}" if moved
                       else f"e.g. {(new or missing)[0]}")
            raise ConfigError(f"{storage.redact(self.out)} holds a run of {len(recorded)} shards; this command names "
                              f"{len(current)} ({len(new)} new, {len(missing)} not named, {len(moved)} from another "
                              f"location: {example}). A run directory holds one shard set: use a new --out")
        self.data["shard_set"] = current

    def record(self, name: str, **entry: Any) -> None:
        """Record shard ``name``'s outcome: its own record file (one small write, whatever the run's
        size), then the summary if it is due (every :data:`SUMMARY_INTERVAL` s, or 20 × the time a
        summary takes to write when that is longer)."""
        previous = self.data["shards"].get(name, {})
        entry["attempts"] = int(previous.get("attempts", 0)) + 1
        self.data["shards"][name] = entry
        location = self.dir.record(name, entry["attempts"])
        text = json.dumps({**entry, "run_id": self.run_id}, sort_keys=True)
        if storage.is_uri(location):  # a PUT's latency: on a few threads, so the driver goes on
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=RECORD_WRITERS, thread_name_prefix="unioncam-records")
            self._writes = [w for w in self._writes if not w.done() or w.result()]  # raises a failed write's error
            self._writes.append(self._writer.submit(storage.write_text, location, text))
        else:
            storage.write_text(location, text)
        if time.monotonic() - self.last_save >= max(SUMMARY_INTERVAL, 20 * self.save_cost):
            self.save()

    def flush(self) -> None:
        """Wait for the records in flight; raises the first write's error."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def save(self) -> None:
        """Rewrite the summary now (compact JSON), once the records in flight are written."""
        self.flush()
        start = time.monotonic()
        shards = self.data["shards"].values()
        self.data["counts"] = {
            "shards_done": sum(s["status"] == "done" for s in shards),
            "shards_failed": sum(s["status"] == "failed" for s in shards),
            "images": sum(s.get("images", 0) for s in shards if s["status"] == "done"),
            "error_rows": sum(s.get("errors", 0) for s in shards if s["status"] == "done")}
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        storage.write_text(self.dir.manifest, json.dumps(self.data, sort_keys=True, separators=(",", ":")) + "\n")
        self.last_save = time.monotonic()
        self.save_cost = self.last_save - start


# -- is this shard done? ------------------------------------------------------------------------------
def check(run_dir: str, manifest: dict[str, Any], names: Iterable[str], save_maps: bool,
          deep: bool = False) -> dict[str, str | None]:
    """The one answer to "is this shard done?": per name, None when it is finished, else why not
    (one line). Finished: the manifest lists it done and :func:`verify_shard` passes. Each output
    folder is listed once (its files' stamps), so unchanged files are neither opened nor read."""
    names = list(names)
    shards = manifest["shards"]
    listed: dict[str, str | None] = {}
    if any(shards.get(n, {}).get("status") == "done" for n in names):
        for folder in FOLDERS:
            listed.update(storage.list_stamps(storage.join(run_dir, folder), ".parquet"))
    out: dict[str, str | None] = {}
    for name in names:
        entry = shards.get(name)
        if not entry:
            out[name] = "not started"
        elif entry.get("status") != "done":
            out[name] = f"{entry.get('status', 'unknown')} before"
        else:
            out[name] = verify_shard(run_dir, name, manifest["run_id"], entry, save_maps, deep, listed)
    return out


def _files(entry: dict[str, Any], save_maps: bool) -> list[tuple[str, pa.Schema | None, Any]]:
    """The outputs a done shard's entry says it has: (folder, schema or None for maps, rows)."""
    checks: list[tuple[str, pa.Schema | None, Any]] = [("metrics", metrics_schema(), entry.get("rows"))]
    if entry.get("sanity"):
        checks.append(("sanity", SANITY_SCHEMA, entry["sanity"]))
    if save_maps:
        checks.append(("maps", None, entry.get("maps")))  # its schema follows the map shape it records
    return checks


def verify_shard(run_dir: str, name: str, run_id: str, entry: dict[str, Any], save_maps: bool,
                 deep: bool = False, listed: dict[str, str | None] | None = None) -> str | None:
    """None when shard ``name``'s files are complete, this run's and as written, else what is wrong.

    A file whose stamp (in ``listed``, from a listing, else a stat) is the one its record kept was
    not touched since it was written: it passes without being opened (unless ``deep``). Otherwise
    ``metrics/<name>.parquet`` must open, carry ``run_id`` and :data:`SCHEMA_VERSION`, have every
    column of :data:`metrics_schema()` and the row count recorded (``entry["rows"]``);
    ``sanity/<name>.parquet`` the same when the entry records sanity rows; when maps are saved,
    ``maps/<name>.parquet`` the same against :func:`maps_schema` of its recorded shape; and each
    file must still hold the bytes it was written with (:func:`content_changed`).
    """
    where = RunDir(run_dir)
    records = entry.get("files") or {}
    for folder, schema, rows in _files(entry, save_maps):
        location = where.output(folder, name)
        record = records.get(folder)
        if isinstance(record, dict) and not deep and record.get("stamp") is not None:
            try:
                now = listed[location] if listed is not None and location in listed else storage.stamp(location)
            except FileNotFoundError:
                return f"{folder}/{name}.parquet is missing"
            except storage.StorageError as exc:
                return f"{folder}/{name}.parquet cannot be read now ({exc})"
            if storage.stamps_match(record["stamp"], now):
                continue  # untouched since it was written
        why = _footer_problem(location, folder, name, run_id, schema, rows)
        if why is None and isinstance(record, dict):
            try:
                changed = content_changed(location, record, deep=True)
            except FileNotFoundError:
                changed = "vanished while it was checked"
            except storage.StorageError as exc:  # unreadable now (after retries): not known to be intact
                changed = f"cannot be read now ({exc})"
            why = None if changed is None else f"{folder}/{name}.parquet {changed}"
        if why is not None:
            return why
    return None


def _footer_problem(location: str, folder: str, name: str, run_id: str, schema: pa.Schema | None,
                    rows: Any) -> str | None:
    """What is wrong with an output file's footer (identity, version, columns, row count), or None."""
    try:
        with storage.open_random(location) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)  # one footer read
            meta, arrow = parquet.metadata, parquet.schema_arrow
            kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    except FileNotFoundError:
        return f"{folder}/{name}.parquet is missing"
    except (OSError, pa.ArrowException, ValueError) as exc:
        return f"{folder}/{name}.parquet is damaged ({type(exc).__name__}: {str(exc)[:200]})"
    if schema is None:
        try:
            schema = maps_schema(json.loads(kv.get("unioncam.map_shape", "")))
        except (ValueError, TypeError):
            return f"{folder}/{name}.parquet records no valid map shape"
    owner = kv.get("unioncam.run_id")
    if owner != run_id:
        return f"{folder}/{name}.parquet belongs to run {owner!r}, not {run_id!r}"
    source = kv.get("unioncam.shard_path")
    if source is not None and shard_name(source) != name:
        return f"{folder}/{name}.parquet holds the rows of shard {shard_name(source)!r}, not {name!r}"
    version = schema_version_problem(arrow)  # the readers' own check, without the readers' advice
    if version is not None:
        return f"{folder}/{name}.parquet {version}"
    optional = optional_columns() if folder == "metrics" else set()  # later metrics' and methods' columns
    missing = [f.name for f in schema if f.name not in arrow.names and f.name not in optional]
    if missing:
        return f"{folder}/{name}.parquet lacks columns {missing[:5]}"
    retyped = [f.name for f in schema if f.name in arrow.names and not arrow.field(f.name).type.equals(f.type)]
    if retyped:
        return f"{folder}/{name}.parquet has other types for columns {retyped[:5]}"
    if rows is not None and meta.num_rows != rows:
        return f"{folder}/{name}.parquet has {meta.num_rows} rows, the manifest recorded {rows}"
    return None


def content_changed(location: str, record: dict[str, Any], deep: bool = False) -> str | None:
    """None when ``location`` still holds the bytes its :func:`unioncam.service.results.file_record`
    describes, else what changed (one line). The stamp is compared first (no read); a moved stamp,
    or ``deep``, hashes the file (local: read; object stores: downloaded)."""
    if not deep and record.get("stamp") is not None and storage.stamps_match(record["stamp"], storage.stamp(location)):
        return None
    digest = storage.sha256(location)
    if digest != record.get("sha256"):
        return (f"changed after it was written (sha256 {str(record.get('sha256'))[:12]} when written, "
                f"{digest[:12]} now)")
    return None


def source_changed(name: str, entry: dict[str, Any], path: str | None = None, deep: bool = False,
                   listed: dict[str, str | None] | None = None) -> str | None:
    """None when shard ``name`` (its manifest ``entry``) was computed from ``path``'s current content
    (default: the source it recorded), else what changed, on one line. Entries of runs older than
    source fingerprints (no ``source``) are not checked.

    The fingerprint is :func:`unioncam.storage.fingerprint`'s: size plus sha256 (files) or ETag (S3).
    When the source's stamp (:func:`unioncam.storage.stamp`; from ``listed`` when given) is the one
    recorded, nothing is read (a rerun does not read the dataset again) unless ``deep``.

    Raises:
        storage.StorageError: the source cannot be read now (nothing is known about a change).
    """
    recorded = entry.get("source")
    if not isinstance(recorded, dict):
        return None
    uri = str(recorded.get("uri"))
    if path is None:
        if "***" in uri:
            return None  # recorded without its credentials: only a rerun with the real URI can check it
        path = uri
    elif uri != storage.redact(path):
        return f"{name} was computed from {uri}, this run names {storage.redact(path)}"
    if not deep and recorded.get("stamp") is not None:
        now = listed[path] if listed is not None and path in listed else storage.stamp(path)
        if storage.stamps_match(recorded["stamp"], now):
            return None
    now_print = storage.fingerprint(path)  # a StorageError (unreadable now) is the caller's to report
    for field in ("bytes", "sha256", "etag"):
        if field in recorded and recorded[field] != now_print.get(field):
            was, new = recorded[field], now_print.get(field)
            if field != "bytes":
                was, new = str(was)[:12], str(new)[:12]
            return f"the content of {storage.redact(path)} changed since {name} was computed ({field} {was} -> {new})"
    return None


def run_files(run_dir: str, folder: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The ``folder`` (``metrics``, ``maps`` or ``sanity``) Parquet files that belong to the run: one per
    shard its manifest lists as done (other files there, e.g. copied from another run, are not part
    of it), or every file when the directory has no manifest.

    Raises:
        RunFileError: a done shard's file was changed after it was written (its stamp moved and its
            bytes differ: :func:`content_changed`), so no reader takes wrong values from it.
    """
    where = RunDir(run_dir)
    if manifest is None:
        if not storage.is_file(where.manifest):
            return storage.list_files(storage.join(run_dir, folder), ".parquet")
        manifest = load_manifest(run_dir)
    shards = manifest["shards"]
    optional = folder in ("maps", "sanity")  # a done shard has them when its entry counts their rows
    names = [n for n in sorted(shards) if shards[n]["status"] == "done"
             and (not optional or shards[n].get(folder, 0) > 0)]
    listed = storage.list_stamps(storage.join(run_dir, folder), ".parquet") if names else {}
    files = []
    for name in names:
        location = where.output(folder, name)
        record = (shards[name].get("files") or {}).get(folder)
        if (isinstance(record, dict) and location in listed
                and not storage.stamps_match(record.get("stamp"), listed[location])):
            changed = content_changed(location, record, deep=True)
            if changed is not None:  # its stamp moved: a rerun redoes the shard
                raise RunFileError(f"{storage.redact(location)} {changed}: rerunning the job redoes its shard "
                                   f"(`unioncam verify {storage.redact(run_dir)}` lists every such shard)")
        files.append(location)
    return files


# -- the lock -------------------------------------------------------------------------------------------
class RunLock:
    """``RUN_DIR/lock.json``: at most one driver per run directory (a second one is refused).

    Created exclusively (``O_EXCL`` locally, a conditional PUT on S3/GCS). The holder rewrites it
    every :data:`LOCK_HEARTBEAT` seconds; a lock whose holder is a dead process on this host, or whose
    heartbeat is older than :data:`LOCK_STALE` seconds (a driver killed on another machine), is taken
    over. It is removed when the run ends, however it ends.
    """

    def __init__(self, out: str) -> None:
        self.path = RunDir(out).lock
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
        host, pid = held.get("host", "?"), held.get("pid", -1)
        if _in_use(held):
            raise ConfigError(
                f"another driver is running on {storage.redact(self.out)} (host {host}, pid {pid}, since "
                f"{held.get('since')}); wait for it to finish, or delete {storage.redact(self.path)} if it is gone")
        log(f"taking over a stale lock on {storage.redact(self.out)} (host {host}, pid {pid})")
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


def _in_use(held: dict[str, Any]) -> bool:
    """Whether a lock's content (:meth:`RunLock._holder`) is a driver's that may still run: its
    heartbeat is under :data:`LOCK_STALE` seconds old and its process is not known dead (dead: its
    host is this one and its pid is gone). A lock that is not in use is taken over by the next run."""
    try:
        host, pid, beat = str(held["host"]), int(held["pid"]), float(held["heartbeat"])
    except (ValueError, KeyError, TypeError):
        return False
    dead_here = host == socket.gethostname() and pid > 0 and not _alive(pid)
    return not dead_here and time.time() - beat < LOCK_STALE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_state(out: str) -> str | None:
    """None when ``out`` has no ``lock.json``, else one line on it, by the rule the next run applies
    (:func:`_in_use`): a driver running now, or a lock left behind by a driver that is gone (killed:
    the next run takes it over)."""
    lock = RunLock(out)
    if not storage.is_file(lock.path):
        return None
    held = lock._holder()
    if not {"host", "pid", "heartbeat"} <= set(held):
        return "lock.json is present but unreadable: a driver may have been killed while writing it"
    host, pid = held["host"], held["pid"]
    if _in_use(held):
        return f"a driver holds lock.json (host {host}, pid {pid}, since {held.get('since')}): the run is in progress"
    beat = held["heartbeat"]
    age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else repr(beat)
    return (f"lock.json was left behind by a driver that is gone (host {host}, pid {pid}, last heartbeat "
            f"{age}): it was killed; rerun the command to finish the run (it takes the lock over)")
