"""The metric registry (unioncam.evaluation.METRICS): a metric is one class and one registration, and the
job's --metrics, the worker's rows, the Parquet schema, rescore and the report's tables all follow it.

A toy metric (the map's mean energy inside its central quarter, one forward per map: f_c of the image
with that quarter kept) is registered for the test and removed after it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from service_data import make_shards

from unioncam.data.shards import iter_samples
from unioncam.engine import predict
from unioncam.evaluation import METRICS, default_metrics, metric_classes, parse_metrics, protocol_columns, scorers
from unioncam.evaluation.base import (
    ColumnType,
    CurvePanel,
    Format,
    MapBatch,
    Metric,
    ReportFacts,
    TableColumn,
    Values,
    mean_of,
)
from unioncam.methods import GradCAM
from unioncam.models import load
from unioncam.service import EvalConfig, read_metrics
from unioncam.service.config import ConfigError
from unioncam.service.report import load_rows, summary_columns, summary_table, write_report
from unioncam.service.report.tables import _table1
from unioncam.service.results import metrics_schema
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator


def _centre(maps: torch.Tensor) -> torch.Tensor:
    """The central quarter of each map (rows and columns from h/4 to 3h/4)."""
    h, w = maps.shape[-2:]
    mask = torch.zeros_like(maps)
    mask[..., h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
    return mask


class CentreMetric(Metric):
    name = "centre"
    title = "share of the map's energy in the central quarter, and f_c with only that quarter shown"
    columns: ClassVar[Mapping[str, ColumnType]] = {"centre_energy": "float64", "centre_prob": "float64"}
    higher_is_better = True
    default = False
    summary_columns: ClassVar[Mapping[str, Format]] = {"centre_energy": "auc", "centre_n": "int"}
    table = (TableColumn("Centre ↑", "centre_energy"),)
    distributions: ClassVar[Mapping[str, str]] = {"centre_energy": "centre energy ↑"}
    figure = "centre.png"

    def forwards_per_map(self) -> int:
        return 1

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        n = int(rows["centre_energy"].notna().sum())
        return [f"Centre: {n} maps of {', '.join(methods)}; protocol {facts.protocol.name}; "
                f"requested {sorted(facts.requested or ())}."]

    @classmethod
    def curves(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[CurvePanel]:
        ok = rows[rows["centre_energy"].notna()]
        return [CurvePanel("centre energy", "x", "y", {m: ([0.0, 1.0], [0.0, mean_of(ok["centre_energy"])], len(ok))
                                                       for m in methods})]

    def score(self, batch: MapBatch) -> list[Values]:
        mask = _centre(batch.maps)
        energy = (batch.maps * mask).sum(dim=(1, 2)) / batch.maps.sum(dim=(1, 2))
        probs = torch.softmax(self.context.model(batch.images * mask[:, None]), dim=1)
        prob = probs.gather(1, batch.targets[:, None])[:, 0]
        return [{"centre_energy": e, "centre_prob": p} if e < 0.999 else "all the energy in the centre"
                for e, p in zip(energy.tolist(), prob.tolist(), strict=True)]

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        return {"centre_energy": mean_of(rows["centre_energy"]), "centre_n": int(rows["centre_energy"].notna().sum())}


@pytest.fixture
def centre_metric() -> Iterator[type[Metric]]:
    METRICS.add(CentreMetric.name, CentreMetric)
    try:
        yield CentreMetric
    finally:
        METRICS.remove(CentreMetric.name)
    assert "centre" not in METRICS.names()


def test_the_built_in_registry() -> None:
    assert METRICS.names() == ["ad", "ai", "insdel", "epg", "road"]
    assert default_metrics() == ["ad", "ai", "insdel", "epg"]  # road: 18 imputations per map, only when asked
    assert [m.name for m in scorers(["ai", "ad", "epg"])] == ["ad", "epg"]  # ad and ai share y, o: computed once
    assert protocol_columns() == ["y", "o", "insertion_auc", "deletion_auc"]
    assert summary_columns() == ["method", "n", "errors", "average_drop", "ad_ci_low", "ad_ci_high",
                                 "average_increase", "ai_ci_low", "ai_ci_high", "insertion_auc", "deletion_auc", "epg",
                                 "n_epg", "road_morf", "road_lerf", "road_combined", "road_n", "seconds_per_image"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) centre; valid: ad, ai, insdel, epg, road"):
        parse_metrics("ad,centre")


def test_a_registered_metric_reaches_config_rows_schema_and_report(tmp_path: Path, centre_metric: type[Metric]) -> None:
    # the job's options: "all" includes it, its name parses; the default list does not (default = False)
    assert parse_metrics("all")[-1] == "centre" and "centre" not in default_metrics()
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) centr"):
        EvalConfig(metrics=["centr"], model="tiny_cnn").resolved()

    # the schema: its columns after the built-in metrics', before the methods' details
    schema = metrics_schema()
    names = schema.names
    assert names[names.index("road_lerf") + 1:names.index("road_lerf") + 3] == ["centre_energy", "centre_prob"]
    assert schema.field("centre_prob").type == pa.float64()

    shards = make_shards(tmp_path / "shards", n_images=4, shard_size=8)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam"], metrics=["ad", "centre"], images_per_batch=2).resolved()
    evaluator = ShardEvaluator(cfg, "cpu", run_id=RunManifest(str(cfg.out), cfg.identity()).run_id)
    assert evaluator.per_map == 2 + 1  # Y and O, and the toy's one forward: progress counts it
    manifest = RunManifest(str(cfg.out), cfg.identity())
    counts = evaluator.evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    metrics_file = tmp_path / "run" / "metrics" / f"{shards[0].stem}.parquet"
    assert pq.read_schema(metrics_file).names == names

    # the rows: the toy's values, by hand from GradCAM's maps on the decoded images
    rows = read_metrics(cfg.out).to_pandas().set_index("key")
    model = load("tiny_cnn").model
    for s in iter_samples(str(shards[0]), (64, 64)):
        x = s["image"][None]
        target = predict(model, x)[0]
        m = GradCAM(model)(x, target).maps
        mask = _centre(m)
        energy = float((m * mask).sum() / m.sum())
        prob = float(torch.softmax(model(x * mask[:, None]), dim=1)[0, int(target)])
        row = rows.loc[s["key"]]
        if energy >= 0.999:
            assert row["error"] == "all the energy in the centre"
            continue
        assert pd.isna(row["error"]) and row["centre_energy"] == pytest.approx(energy, abs=1e-6)
        assert row["centre_prob"] == pytest.approx(prob, abs=1e-6)
        assert np.isnan(row["insertion_auc"]) and row["y"] > 0  # not requested: null; ad: computed

    # the report's tables: summary.csv's columns and values, Table 1's column
    df = load_rows(cfg.out)
    summary = summary_table(df).set_index("method")
    assert list(summary.columns)[-3:] == ["centre_energy", "centre_n", "seconds_per_image"]
    ok = df[df["error"].isna()]
    assert summary.loc["gradcam", "centre_energy"] == pytest.approx(ok["centre_energy"].mean())
    assert summary.loc["gradcam", "centre_n"] == len(ok)
    table = _table1(summary.reset_index(), requested={"ad", "centre"})
    assert table["Centre ↑"].tolist() == [f"{summary.loc['gradcam', 'centre_energy']:.3f}"]

    # the report: the metric's note under Table 1, its figure of curves, its column in the box plots
    manifest.save()
    paths = write_report(cfg.out, overlays=0)
    md = Path(paths["markdown"]).read_text()
    assert f"- Centre: {len(ok)} maps of gradcam; protocol {cfg.protocol}; requested ['ad', 'centre']." in md
    assert "Average Drop = 100/N Σ max(0, Y−O)/Y" in md and "- Average Increase = 100/N Σ 1[Y<O]" in md  # ai: y, o
    report = tmp_path / "run" / "report"
    assert "centre.png" in md and (report / "centre.png").is_file() and not (report / "road.png").exists()
    from PIL import Image

    with Image.open(report / "distributions.png") as png:  # 4.2 inches at 110 dpi per panel: drop, centre
        assert png.size[0] == round(2 * 4.2 * 110)

    # rescore clears and recomputes the columns of the metrics it runs (and the protocol's)
    assert [c for cls in metric_classes(["centre"]) for c in cls.columns] == ["centre_energy", "centre_prob"]


def test_a_metric_without_values_in_a_run_is_not_requested_in_table_1(centre_metric: type[Metric]) -> None:
    summary = pd.DataFrame([{"method": "gradcam", "n": 2, "errors": 0, "seconds_per_image": 0.5}],
                           columns=summary_columns())
    table = _table1(summary, requested={"ad"})
    assert table["Centre ↑"].tolist() == ["not requested"]
    assert table["Average Drop % ↓ [95% CI]"].tolist() == ["–"]  # requested, no value
    assert "ROAD MoRF ↓" not in table.columns  # road: shown only when requested
