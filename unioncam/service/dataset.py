"""A ``torch.utils.data.Dataset`` over a run: each item one saliency map with its row.

For saliency-guided training and other downstream studies::

    ds = SaliencyDataset("runs/vgg16", method=METHOD)  # one method's maps (None: every method's)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=4)
    for batch in loader:  # batch["map"]: B×H×W float32 in [0, 1]; "key", "label", "target", "y", ...
        ...

Rows come from the run's metrics (error rows are left out). Maps are read one shard's file at a
time and kept until an item of another shard is asked for, so going through the items in order
(``shuffle=False``, or a sampler that shuffles within shards) reads each maps file once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from unioncam import storage
from unioncam.service.results import map_array, metrics_schema, read_maps_file, read_metrics


def row_fields() -> dict[str, str]:
    """The row columns each item carries, name → ``"text"``, ``"int"`` or ``"float"``: every column of the
    metrics schema (:func:`unioncam.service.results.metrics_schema`: the registered metrics' and the
    methods' details, ``seed`` and the β's included) except ``error`` (null in the rows kept) and the list
    columns (ROAD's curves, which ``DataLoader`` cannot batch with missing values: read them from
    ``ds.rows``)."""
    out: dict[str, str] = {}
    for f in metrics_schema():
        if f.name == "error" or pa.types.is_list(f.type):
            continue
        out[f.name] = "text" if pa.types.is_string(f.type) else "int" if pa.types.is_integer(f.type) else "float"
    return out


class SaliencyDataset(Dataset[dict[str, Any]]):
    """The error-free rows of ``run_dir`` (a folder or a URI) with their maps, sorted by (shard, key,
    method, rank). ``method`` keeps one method; ``rank`` the ``rank``-th predicted class of a
    ``--target topk:K`` run (None: every rank).

    Each item is a dict: ``map`` (an ``H×W`` float32 tensor in ``[0, 1]``) and the row's
    columns (:func:`row_fields`); a value the row lacks is NaN (numbers), -1 (integers: ``rank``, ``label``,
    ``target``, ``seed``) or "" (text), so ``DataLoader``'s default collation batches every field.
    """

    def __init__(self, run_dir: str | os.PathLike[str], method: str | None = None, rank: int | None = 1) -> None:
        self.run_dir = os.fspath(run_dir)
        self.fields = row_fields()
        rows = read_metrics(self.run_dir).to_pandas()
        rows = rows[rows["error"].isna()]
        if method is not None and method not in set(rows["method"]):
            raise KeyError(f"no rows for method {method!r}; the run has {', '.join(sorted(set(rows['method'])))}")
        if method is not None:
            rows = rows[rows["method"] == method]
        if rank is not None:
            rows = rows[rows["rank"].isna() | (rows["rank"] == rank)]
        self.rows = rows.sort_values(["shard", "key", "method", "rank"]).reset_index(drop=True)
        self._shard: str | None = None
        self._index: dict[tuple[str, str, int | None], int] = {}
        self._maps = np.zeros((0, 0, 0), np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, shard: str) -> None:
        table, shape = read_maps_file(storage.join(self.run_dir, "maps", f"{shard}.parquet"))
        columns = (table.column(c).to_pylist() for c in ("key", "method", "rank"))
        self._index = {(k, m, r): i for i, (k, m, r) in enumerate(zip(*columns, strict=True))}
        self._maps, self._shard = map_array(table, shape), shard

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} items")
        row = self.rows.iloc[index]
        item: dict[str, Any] = {k: _plain(row[k]) if k in row.index else None for k in self.fields}
        rank = None if item["rank"] is None else int(item["rank"])
        if self._shard != item["shard"]:
            self._load(item["shard"])
        found = self._index.get((item["key"], item["method"], rank))
        if found is None:
            raise KeyError(f"maps/{item['shard']}.parquet has no map for {item['key']} / {item['method']}")
        item["map"] = torch.from_numpy(self._maps[found].copy())
        missing = {"text": "", "int": -1, "float": float("nan")}
        for k, kind in self.fields.items():
            v = item[k]
            item[k] = missing[kind] if v is None else int(v) if kind == "int" else float(v) if kind == "float" else v
        return item


def _plain(value: Any) -> Any:
    """A pandas cell as a plain Python value (NaN and <NA> as None)."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value
