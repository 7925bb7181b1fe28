"""The run's Parquet artifacts: explicit schemas, atomic writes, and reading back.

``RUN_DIR/metrics/<shard>.parquet`` holds one row per image × method (:data:`METRICS_SCHEMA`);
``RUN_DIR/maps/<shard>.parquet`` one saliency map per image × method as float16 bytes
(:data:`MAPS_SCHEMA`; the map's shape and dtype are in the schema metadata). Both carry provenance
in their schema metadata (``unioncam.*`` keys: schema version, run id, model, weights sha256,
target layer, input size, precision, library versions). Files are written under a temporary name
and renamed into place, so a reader never sees half a file and a rerun replaces, never appends.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
MAP_DTYPE = "float16"

METRICS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("target", pa.int32()),
    pa.field("target_name", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("y", pa.float64()),  # f_c(I0)
    pa.field("o", pa.float64()),  # f_c(L ⊙ I0)
    pa.field("insertion_auc", pa.float64()),
    pa.field("deletion_auc", pa.float64()),
    pa.field("epg", pa.float64()),
    pa.field("beta_den", pa.float64()),
    pa.field("beta_reg", pa.float64()),
    pa.field("beta_dereg", pa.float64()),
    pa.field("selected", pa.string()),
    pa.field("seconds", pa.float64()),
    pa.field("error", pa.string()),
])

MAPS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("map", pa.binary(), nullable=False),
])


def with_provenance(schema: pa.Schema, provenance: dict[str, Any]) -> pa.Schema:
    """``schema`` with ``unioncam.<name>`` metadata (values JSON-encoded unless strings)."""
    meta = {f"unioncam.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()}
    return schema.with_metadata({"unioncam.schema_version": SCHEMA_VERSION, **meta})


def provenance_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``unioncam.*`` schema metadata of a Parquet file, decoded."""
    meta = pq.read_schema(path).metadata or {}
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


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it onto ``path``
    (same directory, so readers see the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``path.write_text(text)`` through :func:`replaced_atomically`."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


def write_atomic(rows: Sequence[dict[str, Any]], schema: pa.Schema, path: str | os.PathLike[str]) -> None:
    """Write ``rows`` as the Parquet file ``path`` through :func:`replaced_atomically`."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    with replaced_atomically(path) as tmp:
        pq.write_table(table, tmp)


def encode_map(saliency: np.ndarray) -> bytes:
    """A map as little-endian float16 bytes (:data:`MAP_DTYPE`)."""
    return np.ascontiguousarray(saliency, dtype="<f2").tobytes()


def read_metrics(run_dir: str | os.PathLike[str]) -> pa.Table:
    """Every metrics row of a run (all shards), as one Arrow table."""
    files = sorted(Path(run_dir, "metrics").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no metrics/*.parquet under {run_dir}: has the job run there?")
    return pa.concat_tables([pq.read_table(f, schema=METRICS_SCHEMA) for f in files])


def read_saliency(run_dir: str | os.PathLike[str], method: str | None = None,
                  keys: Iterable[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Saliency maps of a run, for downstream studies.

    Args:
        run_dir: the job's ``--out``.
        method: keep only this method (None: all).
        keys: keep only these image keys (None: all).
    Returns:
        ``(keys, methods, maps)``: row-aligned lists and an ``N×H×W`` float32 array in ``[0, 1]``,
        sorted by (key, method).
    Raises:
        FileNotFoundError: the run has no maps (or was run with ``--no-maps``).
        KeyError: some requested keys have no map (the message lists a few).
    """
    files = sorted(Path(run_dir, "maps").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no maps/*.parquet under {run_dir} (run without --no-maps)")
    wanted = None if keys is None else set(keys)
    found: list[tuple[str, str, np.ndarray]] = []
    for f in files:
        meta = provenance_of(f)
        shape = tuple(meta["map_shape"])
        table = pq.read_table(f, schema=MAPS_SCHEMA)
        for key, meth, blob in zip(*(table.column(c).to_pylist() for c in ("key", "method", "map")), strict=True):
            if (method is None or meth == method) and (wanted is None or key in wanted):
                found.append((key, meth, np.frombuffer(blob, dtype=meta.get("map_dtype", MAP_DTYPE)).reshape(shape)))
    if wanted is not None:
        missing = sorted(wanted - {k for k, _, _ in found})
        if missing:
            raise KeyError(f"{len(missing)} key(s) have no map{' for ' + method if method else ''}: {missing[:5]}")
    found.sort(key=lambda r: (r[0], r[1]))
    maps = np.stack([m.astype(np.float32) for _, _, m in found]) if found else np.zeros((0, 0, 0), np.float32)
    return [k for k, _, _ in found], [m for _, m, _ in found], maps
