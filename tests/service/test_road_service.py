"""metrics=road in the service without Ray: the rows equal unioncam.evaluation.road on the same maps, and the
report's ROAD columns are the rows' own means."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from service_data import make_shards

from unioncam.data.shards import iter_samples
from unioncam.evaluation.road import PERCENTILES, road
from unioncam.methods import GradCAM
from unioncam.models import load
from unioncam.service import EvalConfig, read_metrics
from unioncam.service.report import write_report
from unioncam.service.results import provenance_of
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator


def test_road_rows_and_report(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", n_images=3, shard_size=8)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam"], metrics=["ad", "ai", "road"], images_per_batch=1).resolved()
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    counts = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id).evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    rows = read_metrics(cfg.out).to_pandas().set_index("key")
    assert provenance_of(str(Path(str(cfg.out)) / "metrics" / f"{shards[0].stem}.parquet"))["road_percentiles"] == \
        list(PERCENTILES)

    model = load("tiny_cnn").model
    for s in iter_samples(str(shards[0]), (64, 64)):
        x = s["image"][None]
        row = rows.loc[s["key"]]
        target = torch.tensor([int(row["target"])])
        m = GradCAM(model)(x, target).maps
        seed = [int.from_bytes(hashlib.sha256(s["key"].encode()).digest()[:8], "big")]  # the worker's: from the key
        ref = road(model, x, m, target, image_seeds=seed)
        assert len(row["road_morf"]) == len(PERCENTILES) == len(row["road_lerf"])
        np.testing.assert_allclose(np.array(row["road_morf"], float), ref.morf[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(np.array(row["road_lerf"], float), ref.lerf[0].numpy(), atol=1e-6)

    written = write_report(str(cfg.out), overlays=0)
    summary = pd.read_csv(written["summary"]).set_index("method")
    morf = np.stack([np.array(v, float) for v in rows["road_morf"]]).mean(axis=1)
    lerf = np.stack([np.array(v, float) for v in rows["road_lerf"]]).mean(axis=1)
    assert np.isclose(summary.loc["gradcam", "road_morf"], morf.mean())
    assert np.isclose(summary.loc["gradcam", "road_lerf"], lerf.mean())
    assert np.isclose(summary.loc["gradcam", "road_combined"], ((lerf - morf) / 2).mean())
    report = Path(str(cfg.out)) / "report"
    assert (report / "road.png").is_file() and "ROAD combined ↑" in (report / "report.md").read_text()
