"""Evaluation: the metrics, their protocols, ROAD, the sanity check, aggregation, and the metric registry.

Modules: :mod:`~unioncam.evaluation.drop_increase` (Average Drop / Increase), :mod:`~.curves`
(insertion/deletion), :mod:`~.localization` (energy pointing game), :mod:`~.road`, :mod:`~.sanity`
(model parameter randomization), :mod:`~.protocols` (the libraries' conventions), :mod:`~.summary`
(mean and bootstrap interval) and :mod:`~.base` (:class:`~unioncam.evaluation.base.Metric`).

Adding a metric: one module with a :class:`Metric` subclass (its columns, direction, boxes, forwards
per map, :meth:`~Metric.score` and :meth:`~Metric.summarize`) and one line here, ``METRICS.add``.
The job's ``--metrics``, the worker, the Parquet schema, rescore and the report's tables, notes and
figures derive from the registry (``tests/evaluation/test_metric_registry.py`` registers a toy metric and
finds it in each).
"""

from __future__ import annotations

from collections.abc import Sequence

from unioncam.evaluation.base import MapBatch, Metric, MetricContext, TableColumn
from unioncam.evaluation.curves import InsertionDeletion, deletion_auc, gaussian_blur, insertion_auc, insertion_deletion
from unioncam.evaluation.drop_increase import AverageDrop, AverageIncrease, average_drop, average_increase, confidence
from unioncam.evaluation.localization import EnergyPointingGame, energy_pointing_game
from unioncam.evaluation.road import Road
from unioncam.evaluation.summary import Summary, bootstrap_ci, summarize
from unioncam.registry import Registry, parse_names

METRICS: Registry[type[Metric]] = Registry("metric")
for _cls in (AverageDrop, AverageIncrease, InsertionDeletion, EnergyPointingGame, Road):
    METRICS.add(_cls.name, _cls)


def get_metric(name: str) -> type[Metric]:
    """The metric registered as ``name``; an unknown name raises with the valid ones."""
    return METRICS.get(name)


def metric_classes(names: Sequence[str] | None = None) -> list[type[Metric]]:
    """The registered metrics (``names`` given: those, in registry order)."""
    wanted = None if names is None else {METRICS.canonical(n) for n in names}
    return [METRICS.get(n) for n in METRICS.names() if wanted is None or n in wanted]


def default_metrics() -> list[str]:
    """The job's default ``--metrics``: every registered metric whose ``default`` is true."""
    return [n for n in METRICS.names() if METRICS.get(n).default]


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list (or a list) of metric names, validated, in canonical
    spelling; may be empty (:func:`unioncam.registry.parse_names`)."""
    return parse_names(spec, METRICS.names(), "metric", empty_ok=True)


def scorers(names: Sequence[str]) -> list[type[Metric]]:
    """The metrics of ``names`` that compute something, in registry order: of metrics declaring the
    same columns (Average Drop and Increase: ``y``, ``o``) only the first, so those columns are
    computed once."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for cls in metric_classes(names):
        cols = tuple(cls.columns)
        if cols not in seen:
            seen.add(cols)
            out.append(cls)
    return out


def row_columns() -> dict[str, str]:
    """Every registered metric's row columns (name → type) in registry order, each once."""
    return {c: t for cls in metric_classes() for c, t in cls.columns.items()}


def protocol_columns() -> list[str]:
    """The row columns a protocol defines (``by_protocol`` metrics'): a rescore always clears them."""
    return list(dict.fromkeys(c for cls in metric_classes() if cls.by_protocol for c in cls.columns))


__all__ = ["METRICS", "AverageDrop", "AverageIncrease", "EnergyPointingGame", "InsertionDeletion", "MapBatch",
           "Metric", "MetricContext", "Road", "Summary", "TableColumn", "average_drop", "average_increase",
           "bootstrap_ci", "confidence", "default_metrics", "deletion_auc", "energy_pointing_game", "gaussian_blur",
           "get_metric", "insertion_auc", "insertion_deletion", "metric_classes", "parse_metrics",
           "protocol_columns", "row_columns", "scorers", "summarize"]
