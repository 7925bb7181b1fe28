"""What every metric shares: input checks, the :class:`Metric` declaration and its registry's types.

A *row metric* scores each explained map (one Parquet row per image × method × target) and declares
everything the service derives from it (:mod:`unioncam.evaluation`, "Adding a metric"): the columns
it writes (name → Arrow type name), which way is better, whether it needs boxes, its masked forwards
per map, how it scores a batch of maps, and how the report summarizes and shows it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from unioncam.evaluation.protocols import Protocol

ColumnType = Literal["float64", "list<float64>"]  # the Arrow type a row column is stored as
Format = Literal["int", "pct", "auc"]  # how the report shows a summary column: count, percent (2 d.p.), AUC (3 d.p.)
Values = dict[str, Any] | str  # one map's column values, or why its row is an error


@dataclass(frozen=True)
class MetricContext:
    """What a worker gives every metric: the model, its input size, the batch size and precision of
    the metric forwards, the protocol and the insertion/deletion steps (None: the protocol's)."""

    model: nn.Module
    size: tuple[int, int]
    batch_size: int
    precision: str
    protocol: Protocol
    insdel_steps: int | None = None


@dataclass(frozen=True)
class MapBatch:
    """Maps to score at once (of several images and methods): ``maps[j]`` explains ``images[j]``
    (``N×3×H×W`` in ``[0, 1]``) for class ``targets[j]``; ``keys[j]`` is the sample's key (seeds
    noise per image), ``boxes[j]`` its boxes (``[xmin, ymin, xmax, ymax]`` pixels) or None."""

    images: Tensor
    maps: Tensor
    targets: Tensor
    keys: list[str]
    boxes: list[Any]


@dataclass(frozen=True)
class TableColumn:
    """A column of the report's Table 1: its ``header``, the summary column it shows and, for a mean
    with a confidence interval, the summary columns of the interval (``"10.40 [9.10, 11.70]"``);
    ``count``: a count shown as is (never "not requested")."""

    header: str
    value: str
    ci: tuple[str, str] | None = None
    count: bool = False


@dataclass(frozen=True)
class ReportFacts:
    """What the report tells a metric about the run: its ``protocol``, the files' ``provenance`` (the
    first shard's) and the metrics it ``requested`` (None: not recorded, an older run)."""

    protocol: Protocol
    provenance: Mapping[str, Any]
    requested: frozenset[str] | None


@dataclass(frozen=True)
class CurvePanel:
    """One panel of a metric's curves: per method, ``(xs, ys, images)`` (the images averaged)."""

    title: str
    xlabel: str
    ylabel: str
    lines: Mapping[str, tuple[list[float], list[float], int]]


class Metric(abc.ABC):
    """A row metric: one instance per worker (:class:`MetricContext`), :meth:`score` per batch of maps.

    Class attributes (what the service derives everything from):
        name: as users type it (``--metrics ad,insdel``).
        title: what it is, for ``--help`` and docs.
        columns: the row columns it writes, name → :data:`ColumnType`, in the Parquet schema's
            order. Metrics that declare the same columns (Average Drop and Increase: ``y``, ``o``)
            compute them once.
        higher_is_better: which way is better (the report's arrows and the docs).
        needs_boxes: it has values only for samples with boxes (EPG).
        by_protocol: the protocol (:mod:`unioncam.evaluation.protocols`) defines its values, so a
            rescore under another protocol always clears them.
        default: in the job's default ``--metrics`` (``all`` takes every registered metric).
        summary_columns: the columns :meth:`summarize` adds to ``summary.csv``, name → :data:`Format`.
        table: its columns in the report's Table 1.
        table_when_requested: Table 1 shows :attr:`table` only when the run requested the metric.
        distributions: per-image columns (stored or :meth:`derive`'s) the report's box plots show
            (``distributions.png``), column → title.
        figure: the file of :meth:`curves`' figure in the report (``road.png``).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    columns: ClassVar[Mapping[str, ColumnType]]
    higher_is_better: ClassVar[bool]
    needs_boxes: ClassVar[bool] = False
    by_protocol: ClassVar[bool] = False
    default: ClassVar[bool] = True
    summary_columns: ClassVar[Mapping[str, Format]] = {}
    table: ClassVar[tuple[TableColumn, ...]] = ()
    table_when_requested: ClassVar[bool] = False
    distributions: ClassVar[Mapping[str, str]] = {}
    figure: ClassVar[str | None] = None

    def __init__(self, context: MetricContext) -> None:
        self.context = context

    @classmethod
    def unavailable(cls, protocol: Protocol) -> str | None:
        """Why ``protocol`` defines no such metric (the job then drops it), or None."""
        return None

    @classmethod
    def provenance(cls, requested: bool) -> dict[str, Any]:
        """Settings recorded in the files' provenance (``requested``: the run computes the metric)."""
        return {}

    @classmethod
    def derive(cls, rows: Any, protocol: Protocol) -> dict[str, Any]:
        """Per-row values the report computes from the stored columns (``rows``: a pandas DataFrame
        of a run's rows), name → array; e.g. Average Drop's per-image ``drop`` under the run's protocol."""
        return {}

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        """Lines under the report's Table 1 (its rule, what it left out and why), when the report speaks of
        the metric: the run requested it, did not record what it requested, or its columns have values;
        with :attr:`table_when_requested`, only when requested (as Table 1). ``rows``: the run's rows with
        :meth:`derive`'s."""
        return []

    @classmethod
    def curves(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[CurvePanel]:
        """The panels of the report's figure :attr:`figure` (none: no figure), from the run's rows; called
        only for a metric with :attr:`figure`, when the report speaks of it (:meth:`notes`' rule, without
        :attr:`table_when_requested`'s)."""
        return []

    @abc.abstractmethod
    def forwards_per_map(self) -> int:
        """The masked inputs :meth:`score` runs per map (for progress within a batch)."""

    @abc.abstractmethod
    def score(self, batch: MapBatch) -> list[Values]:
        """Per map of ``batch``: its :attr:`columns`' values (a subset: EPG without boxes gives ``{}``),
        or an error text that makes its row an error. An exception fails the batch; the worker then
        scores each map alone, so one failing map costs one row."""

    @classmethod
    @abc.abstractmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        """:attr:`summary_columns`' values over ``rows`` (a pandas DataFrame: one method's error-free
        rows, with :meth:`derive`'s columns); NaN where no row has a value."""


def mean_of(values: Any) -> float:
    """The mean of the non-null entries of a pandas Series, NaN when there are none."""
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def check_maps(images: Tensor, maps: Tensor) -> None:
    """``maps`` must be finite ``B×H×W`` at ``images``' size."""
    if maps.dim() != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps must be B×H×W matching images {tuple(images.shape)}, got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or infinite values")

