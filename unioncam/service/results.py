"""The run's Parquet artifacts: explicit schemas, atomic writes, and reading back.

``RUN_DIR/metrics/<shard>.parquet`` holds one row per image × method (:func:`metrics_schema`);
``RUN_DIR/maps/<shard>.parquet`` one saliency map per image × method (:func:`maps_schema`:
``FixedSizeList<float16>[H·W]``, the shape in the field and schema metadata). Both carry provenance
in their schema metadata (``unioncam.*`` keys: schema version, run id, model, weights sha256,
target layer, input size, precision, library versions). Each file is written once, whole, under its
final name (:func:`unioncam.storage.write_bytes`: rename locally, one PUT on object stores), so a
reader never sees half a file and a rerun replaces, never appends.

Integrity: every file is written with Parquet page checksums (CRC32 of each data page) and every
reader here verifies them, so a changed byte in a data page is an error naming the file, never a
wrong value. Each write also returns the file's record (:func:`file_record`: size, sha256 of the
bytes as written, and :func:`unioncam.storage.stamp`), which the driver keeps in the shard's
manifest entry; :func:`unioncam.service.rundir.verify_shard` compares it (the stamp first, the hash
when the stamp moved or with ``deep``). Every reader checks the schema version (:func:`open_output`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unioncam import storage
from unioncam.evaluation import row_columns
from unioncam.methods import row_detail_columns

SCHEMA_VERSION = "3"  # 2: a rank column (--target topk:K), maps as FixedSizeList<float16>[H·W]; 3: ROAD, sanity
MAP_DTYPE = "float16"  # recorded in the maps file's provenance

_ARROW_TYPES = {"float64": pa.float64(), "list<float64>": pa.list_(pa.float64()), "int64": pa.int64(),
                "string": pa.string()}  # the type names metrics (evaluation.base.ColumnType) and methods declare
_ROW_FIELDS = [  # what a row is: the sample, the method and the class it explains
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("target", pa.int32()),
    pa.field("target_name", pa.string()),
    pa.field("rank", pa.int32()),  # the target's rank among the predictions (1: predicted); null for labels
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
]
_TAIL_FIELDS = [pa.field("seconds", pa.float64()), pa.field("error", pa.string())]  # the map's seconds, the error


def metrics_schema() -> pa.Schema:
    """The metrics file's schema: the row's sample, method and class, then every registered metric's
    columns (:func:`unioncam.evaluation.row_columns`), then every registered method's details
    (:func:`unioncam.methods.row_detail_columns`: UnionCAM's β's and AMS branch, a seeded method's
    seed), each in registry order, then ``seconds`` and ``error``. A metric or method registered
    later adds its columns: files written before it read them as nulls (:func:`optional_columns`)."""
    return pa.schema([*_ROW_FIELDS, *(pa.field(c, _ARROW_TYPES[t]) for c, t in row_columns().items()),
                      *(pa.field(c, _ARROW_TYPES[t]) for c, t in row_detail_columns().items()), *_TAIL_FIELDS])


#: the columns every metrics file of :data:`SCHEMA_VERSION` has (the schema as version 3 defined it)
VERSION_COLUMNS = frozenset({
    "key", "shard", "method", "target", "target_name", "rank", "label", "label_name", "y", "o", "insertion_auc",
    "deletion_auc", "epg", "road_morf", "road_lerf", "beta_den", "beta_reg", "beta_dereg", "selected", "seconds",
    "error"})


def optional_columns() -> set[str]:
    """The metrics columns a file may lack: those declared since :data:`SCHEMA_VERSION` was defined,
    by metrics and methods registered later (``seed``, a plugin's metric). Readers take them as
    nulls; ``unioncam verify`` does not ask for them (it still asks for every other column)."""
    return set(metrics_schema().names) - VERSION_COLUMNS

MAPS_COLUMNS = ("key", "method", "rank", "map")

SANITY_SCHEMA = pa.schema([  # RUN_DIR/sanity/<shard>.parquet (--sanity): unioncam.evaluation.sanity.SanityResult.rows()
    pa.field("key", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("rank", pa.int32()),
    pa.field("target", pa.int32()),
    pa.field("step", pa.int32()),  # 0: no layer randomized yet; k: the cascade down to `layer`
    pa.field("layer", pa.string()),
    pa.field("spearman", pa.float64()),  # rank correlation with the original map
    pa.field("ssim", pa.float64()),
    pa.field("failed", pa.bool_()),  # the method gave NaN/inf on this randomized model
    pa.field("error", pa.string()),  # the check could not run for this image
])
MAPS_ROW_GROUP = 256  # maps per Parquet row group (224² float16 maps: ~25 MB): what a reader holds at once


def maps_schema(shape: tuple[int, int] | list[int]) -> pa.Schema:
    """The maps table for ``H×W`` maps: ``map`` is a ``FixedSizeList<float16>[H·W]`` (row-major) with
    ``shape`` in its field metadata, so pandas, DuckDB, Ray Data and Hugging Face ``datasets`` see
    arrays (not bytes); :func:`read_saliency` reshapes them."""
    h, w = (int(v) for v in shape)
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("rank", pa.int32()),
        pa.field("map", pa.list_(pa.float16(), h * w), nullable=False, metadata={"shape": json.dumps([h, w])}),
    ])


def maps_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Maps rows (``key``, ``method``, ``rank``, ``map``: an ``H×W`` array) as an Arrow table of
    ``schema`` (:func:`maps_schema`), built columnar (no per-value Python objects)."""
    size = schema.field("map").type.list_size
    flat = np.concatenate([np.asarray(r["map"], dtype=np.float16).reshape(-1) for r in rows]) if rows \
        else np.zeros(0, np.float16)
    if flat.size != size * len(rows):
        raise ValueError(f"maps of {flat.size // max(len(rows), 1)} values for a {size}-value map column")
    maps = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), size)
    columns = [pa.array([r[c] for r in rows], type=schema.field(c).type) for c in ("key", "method", "rank")]
    return pa.Table.from_arrays([*columns, maps], schema=schema)


class RunFileError(ValueError):
    """A run's Parquet file that cannot be read as this version writes it: damaged, not a unioncam
    output, or of another schema version. The message (one line) names the file and what to do."""


def schema_version_problem(schema: pa.Schema) -> str | None:
    """What keeps this release from reading a run file of ``schema``: no unioncam schema version, or another
    than :data:`SCHEMA_VERSION` (one clause, without advice); None when it can."""
    found = (schema.metadata or {}).get(b"unioncam.schema_version")
    if found is None:
        return f"carries no unioncam schema version (this release reads version {SCHEMA_VERSION})"
    if found.decode() != SCHEMA_VERSION:
        from unioncam import __version__

        return f"has schema version {found.decode()}; unioncam {__version__} reads version {SCHEMA_VERSION}"
    return None


def check_schema_version(schema: pa.Schema, location: str) -> None:
    """Raise :class:`RunFileError` unless ``schema`` (a run file's) carries :data:`SCHEMA_VERSION`, with what
    a reader can do about it (:func:`schema_version_problem` says what is wrong, for the job and ``verify``)."""
    problem = schema_version_problem(schema)
    if problem is None:
        return
    shown = storage.redact(location)
    if b"unioncam.schema_version" not in (schema.metadata or {}):
        raise RunFileError(f"{shown} {problem}: not a file the unioncam job wrote; point the reader at a run "
                           "directory's files")
    wrote = (schema.metadata or {}).get(b"unioncam.unioncam_version", b"?").decode()
    raise RunFileError(f"{shown} {problem}: rerun the job into a new --out with this version, or read it with the "
                       f"unioncam release that wrote it ({wrote})")


def _damaged(location: str, exc: BaseException) -> RunFileError:
    text = " ".join(str(exc).split())[:200]
    return RunFileError(f"{storage.redact(location)} is damaged ({type(exc).__name__}: {text}): delete it and rerun "
                        "the job to redo its shard (`unioncam verify --deep RUN_DIR` lists every damaged file)")


@contextlib.contextmanager
def open_output(location: str) -> Iterator[pq.ParquetFile]:
    """A run's Parquet file (local or a URI), open for reading with page checksums verified, after
    :func:`check_schema_version`.

    Raises:
        RunFileError: the file is damaged (a bad footer, or a data page whose checksum or encoding
            fails while the caller reads it) or of another schema version.
        storage.StorageError: it cannot be read now (``FileNotFoundError`` when it is missing).
    """
    with storage.open_random(location) as handle:
        try:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
        except storage.StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise _damaged(location, exc) from None
        check_schema_version(parquet.schema_arrow, location)
        try:
            yield parquet
        except storage.StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:  # a page's checksum, decompression or decoding failed
            raise _damaged(location, exc) from None


def with_provenance(schema: pa.Schema, provenance: dict[str, Any]) -> pa.Schema:
    """``schema`` with ``unioncam.<name>`` metadata (values JSON-encoded unless strings)."""
    meta = {f"unioncam.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()}
    return schema.with_metadata({"unioncam.schema_version": SCHEMA_VERSION, **meta})


def provenance_of(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``unioncam.*`` schema metadata of a Parquet file (local or a URI), decoded."""
    return _provenance(_parquet_schema(os.fspath(location)))


def _provenance(schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("unioncam."):
            text = v.decode()
            try:
                out[key.removeprefix("unioncam.")] = json.loads(text)
            except json.JSONDecodeError:
                out[key.removeprefix("unioncam.")] = text
    return out


def _parquet_schema(location: str) -> pa.Schema:
    with open_output(location) as parquet:
        return parquet.schema_arrow


def parquet_bytes(rows: Sequence[dict[str, Any]] | pa.Table, schema: pa.Schema, row_group_size: int | None = None
                  ) -> bytes:
    """``rows`` (dicts, or a table) as a Parquet file's bytes (validated against ``schema`` by Arrow),
    with page checksums."""
    table = rows.cast(schema) if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, write_page_checksum=True)
    return bytes(sink.getvalue())


def file_record(location: str, size: int, sha256: str) -> dict[str, Any]:
    """What a shard's manifest entry keeps of an output file just written: ``bytes``, ``sha256`` of
    the bytes as written (computed while writing, never by reading the file again) and ``stamp``
    (:func:`unioncam.storage.stamp`, taken now)."""
    return {"bytes": size, "sha256": sha256, "stamp": storage.stamp(location)}


def write_parquet(rows: Sequence[dict[str, Any]] | pa.Table, schema: pa.Schema,
                  location: str | os.PathLike[str], row_group_size: int | None = None) -> dict[str, Any]:
    """Write ``rows`` as the Parquet file ``location``, all or nothing (:func:`unioncam.storage.write_bytes`);
    returns its :func:`file_record`."""
    data = parquet_bytes(rows, schema, row_group_size)
    storage.write_bytes(os.fspath(location), data)
    return file_record(os.fspath(location), len(data), hashlib.sha256(data).hexdigest())


def read_parquet(location: str, schema: pa.Schema | None = None) -> pa.Table:
    """One of a run's Parquet files (local or a URI), checked by :func:`open_output`."""
    return read_output(location, schema)[0]


def read_output(location: str, schema: pa.Schema | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """One of a run's Parquet files and its provenance, from one open (one GET on object stores),
    checked by :func:`open_output`; ``schema`` given, its columns in its order and types, a column
    the file lacks that is a metric's or a method's detail (:func:`optional_columns`) as nulls."""
    with open_output(location) as parquet:
        table, prov = parquet.read(), _provenance(parquet.schema_arrow)
    if schema is not None:
        late = optional_columns()
        for field in schema:
            if field.name not in table.column_names and field.name in late:
                table = table.append_column(field, pa.nulls(len(table), field.type))
        table = table.select(schema.names).cast(schema)
    return table, prov


class _HashingFile(io.RawIOBase):
    """A local file written front to back that hashes its bytes as they go (no second read)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.handle = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.handle.write(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self.handle.closed:
            self.handle.flush()

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        super().close()


class MapsWriter:
    """Maps rows streamed to a local temporary Parquet file, :data:`MAPS_ROW_GROUP` per row group, so a
    worker holds one row group of maps, not a shard's (1,000 images × 7 maps × 224² × 2 B ≈ 700 MB),
    hashed as it is written. :meth:`commit` moves the finished file into place
    (:func:`unioncam.storage.put_file`: a rename, or one upload) and returns its :func:`file_record`;
    :meth:`discard` removes it."""

    def __init__(self, schema: pa.Schema) -> None:
        import tempfile

        self.schema = schema
        fd, self.path = tempfile.mkstemp(prefix="unioncam-maps-", suffix=".parquet")
        os.close(fd)
        self.sink = _HashingFile(self.path)
        self.writer: pq.ParquetWriter | None = pq.ParquetWriter(self.sink, schema, write_page_checksum=True)
        self.pending: list[dict[str, Any]] = []
        self.count = 0

    def append(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        self.count += 1
        if len(self.pending) >= MAPS_ROW_GROUP:
            self._flush()

    def __len__(self) -> int:
        return self.count

    def _flush(self) -> None:
        if self.pending and self.writer is not None:
            self.writer.write_table(maps_table(self.pending, self.schema), row_group_size=MAPS_ROW_GROUP)
            self.pending = []

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.sink.close()

    def commit(self, location: str) -> dict[str, Any]:
        """Finish the file and put it at ``location`` (all or nothing); returns its :func:`file_record`."""
        self._flush()
        self._close()
        storage.put_file(self.path, location)
        return file_record(location, self.sink.size, self.sink.digest.hexdigest())

    def discard(self) -> None:
        self._close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def read_metrics(run_dir: str | os.PathLike[str]) -> pa.Table:
    """Every metrics row of a run (all its done shards, :func:`unioncam.service.rundir.run_files`;
    ``run_dir`` a folder or a URI), as one Arrow table."""
    from unioncam.service.rundir import run_files

    run_dir = os.fspath(run_dir)
    return read_metrics_files(run_dir, run_files(run_dir, "metrics"))[0]


def read_metrics_files(run_dir: str, files: list[str]) -> tuple[pa.Table, dict[str, dict[str, Any]]]:
    """The rows of a run's metrics ``files`` as one table (:func:`metrics_schema`), and each file's
    provenance by shard name, each file opened once."""
    if not files:
        raise FileNotFoundError(f"no metrics/*.parquet under {storage.redact(run_dir)}: has the job run there?")
    schema = metrics_schema()
    tables, provenance = [], {}
    for f in files:
        table, provenance[storage.basename(f).removesuffix(".parquet")] = read_output(f, schema)
        tables.append(table)
    return pa.concat_tables(tables), provenance


def read_saliency(run_dir: str | os.PathLike[str], method: str | None = None,
                  keys: Iterable[str] | None = None, rank: int | None = 1,
                  shards: Iterable[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Saliency maps of a run, for downstream studies.

    Args:
        run_dir: the job's ``--out`` (a folder or a URI such as ``s3://bucket/run``).
        method: keep only this method (None: all).
        keys: keep only these image keys (None: all).
        rank: with ``--target topk:K``, the maps of the ``rank``-th predicted class (1: the
            predicted class, the default; None: every rank, so keys repeat). Label-target runs
            have no rank and are always returned whole.
        shards: read only these shards' maps files (None: all the run's); with ``keys``, pass the
            shards that hold them (the metrics rows say which) so no other file is opened.
    Returns:
        ``(keys, methods, maps)``: row-aligned lists and an ``N×H×W`` float32 array in ``[0, 1]``,
        sorted by (key, method, rank).
    Raises:
        FileNotFoundError: the run has no maps (or was run with ``--no-maps``).
        KeyError: an unknown method, or requested keys that have no map (the message lists a few).

    Memory: each file is read one row group at a time (the job writes :data:`MAPS_ROW_GROUP` maps
    per group), the small ``key``/``method``/``rank`` columns first, and the ``map`` column only of
    row groups that hold a wanted row, so picking a few keys out of a large run stays cheap.
    """
    import pyarrow.compute as pc

    from unioncam.service.rundir import run_files

    run_dir = os.fspath(run_dir)
    files = run_files(run_dir, "maps")
    if shards is not None:
        chosen = set(shards)
        files = [f for f in files if storage.basename(f).removesuffix(".parquet") in chosen]
    if not files:
        raise FileNotFoundError(f"no maps/*.parquet under {storage.redact(run_dir)} (run without --no-maps)")
    wanted = None if keys is None else pa.array(sorted(set(keys)), type=pa.string())
    parts: list[pa.Table] = []
    shape: tuple[int, int] = (0, 0)
    methods: set[str] = set()
    have: set[str] = set()  # every key of the files read (an error names a few when requested keys are missing)
    for f in files:
        with open_output(f) as parquet:
            shape = _map_shape(parquet, f)
            for group in range(parquet.num_row_groups):
                index = parquet.read_row_group(group, columns=["key", "method", "rank"])
                methods.update(index.column("method").unique().to_pylist())
                if wanted is not None:
                    have.update(index.column("key").unique().to_pylist())
                mask = pa.array(np.ones(index.num_rows, dtype=bool))
                if method is not None:
                    mask = pc.and_(mask, pc.equal(index.column("method"), method))
                if wanted is not None:
                    mask = pc.and_(mask, pc.is_in(index.column("key"), wanted))
                if rank is not None:
                    same = pc.or_kleene(pc.is_null(index.column("rank")), pc.equal(index.column("rank"), rank))
                    mask = pc.and_(mask, same)
                if pc.any(mask).as_py():
                    maps = parquet.read_row_group(group, columns=["map"]).column("map")
                    parts.append(index.append_column("map", maps).filter(mask))
    if method is not None and method not in methods:
        raise KeyError(f"no maps for method {method!r}; the run has {', '.join(sorted(methods))}")
    if not parts:
        found = pa.table({c: pa.array([], type=pa.string()) for c in ("key", "method")})
        got: list[str] = []
    else:
        found = pa.concat_tables(parts).sort_by([("key", "ascending"), ("method", "ascending"),
                                                 ("rank", "ascending")])
        got = found.column("key").to_pylist()
    if wanted is not None:
        missing = sorted(set(wanted.to_pylist()) - set(got))
        if missing:
            some = sorted(have)[:5]
            raise KeyError(f"{len(missing)} key(s) have no map{' for ' + method if method else ''}: {missing[:5]}; "
                           f"the run's maps have {len(have)} keys, e.g. {some}")
    return got, found.column("method").to_pylist(), map_array(found, shape) if got else np.zeros((0, *shape))


def read_maps_file(location: str) -> tuple[pa.Table, tuple[int, int]]:
    """One maps file (local or a URI): its table (:data:`MAPS_COLUMNS`) and the maps' ``(H, W)``."""
    with open_output(location) as parquet:  # one open: provenance and rows
        shape = _map_shape(parquet, location)
        return parquet.read(columns=list(MAPS_COLUMNS)), shape


def _map_shape(parquet: pq.ParquetFile, location: str) -> tuple[int, int]:
    """The ``(H, W)`` a maps file records in its provenance."""
    try:
        h, w = _provenance(parquet.schema_arrow)["map_shape"]
        return int(h), int(w)
    except (KeyError, TypeError, ValueError):
        raise RunFileError(f"{storage.redact(location)} records no map shape (unioncam.map_shape): not a maps file "
                           "the unioncam job wrote") from None


def map_array(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """The ``map`` column of a maps table as an ``N×H×W`` float32 array (one copy, no Python loop)."""
    if table.num_rows == 0:
        return np.zeros((0, *shape), np.float32)
    values = table.column("map").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32).reshape(table.num_rows, *shape)
