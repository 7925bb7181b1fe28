"""A run as the report reads it: its manifest, rows and provenance, each read once (:class:`RunData`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from unioncam import storage
from unioncam.evaluation import metric_classes
from unioncam.evaluation.protocols import Protocol, get_protocol
from unioncam.service.results import read_metrics_files, read_output
from unioncam.service.rundir import load_manifest, run_files


@dataclass
class RunData:
    """Everything the report takes from a run directory, read once: ``manifest.json`` (``{}`` for a
    folder without one), every done shard's metrics rows with each metric's derived values
    (:meth:`Metric.derive <unioncam.evaluation.base.Metric.derive>`), each metrics file's
    provenance (by shard, from the same read), the maps files, and the sanity rows and provenance
    (``--sanity``; None without)."""

    run_dir: str
    manifest: dict[str, Any]
    rows: pd.DataFrame
    provenance: dict[str, dict[str, Any]]
    protocol: Protocol
    maps_files: list[str]
    sanity_rows: pd.DataFrame | None
    sanity_provenance: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config") or {})

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str], *, maps: bool = True, sanity: bool = True) -> RunData:
        run_dir = storage.absolute(run_dir)
        manifest = load_manifest(run_dir) if storage.is_file(storage.join(run_dir, "manifest.json")) else {}
        listed = manifest or None  # run_files lists the folder when the run has no manifest
        table, provenance = read_metrics_files(run_dir, run_files(run_dir, "metrics", listed))
        protocol = get_protocol(str((manifest.get("config") or {}).get("protocol") or "reference"))
        rows = table.to_pandas()
        for metric in metric_classes():
            for name, values in metric.derive(rows, protocol).items():
                rows[name] = values
        sanity_rows, sanity_prov = None, dict[str, Any]()
        if sanity:
            parts = []
            for f in run_files(run_dir, "sanity", listed):
                part, sanity_prov = read_output(f)
                parts.append(part.to_pandas())
            sanity_rows = pd.concat(parts, ignore_index=True) if parts else None
        return cls(run_dir, manifest, rows, provenance, protocol, run_files(run_dir, "maps", listed) if maps else [],
                   sanity_rows, sanity_prov)


def load_rows(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """All metrics rows of a run with each metric's derived per-row values added (per-image ``drop``
    and ``increase`` in percent, the drop by the run's protocol; ``reference``: ``100·max(0, Y−O)/Y``)."""
    return RunData.load(run_dir, maps=False, sanity=False).rows
