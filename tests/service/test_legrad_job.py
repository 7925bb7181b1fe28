"""LeGrad in the job (issue 26: every method works in the job): on a timm ViT its rows and stored maps are
``unioncam.explain``'s, and ``--methods gradient`` on that ViT keeps it while the driver leaves out what
cannot explain the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from service_data import make_shards

from unioncam import explain
from unioncam.data.shards import iter_samples
from unioncam.engine import predict
from unioncam.service import EvalConfig, read_metrics
from unioncam.service.results import map_array, read_maps_file
from unioncam.service.runner import check_model
from unioncam.service.worker import ShardEvaluator

timm = pytest.importorskip("timm")


def test_legrad_rows_and_maps_in_the_job_equal_explain(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), weights)
    shard = make_shards(tmp_path / "shards", n_images=2, shard_size=8)[0]
    base = {"shards": str(shard), "model": "timm:vit_tiny_patch16_224", "weights": str(weights), "metrics": ["ad"]}
    family = EvalConfig(**base, out=str(tmp_path / "f"), methods=["gradient"]).resolved()
    loaded, checked = check_model(family)  # the driver: integrativecam cannot explain a ViT, LeGrad can
    assert "legrad" in checked.methods and "integrativecam" not in checked.methods
    assert "integrativecam" in family.methods

    cfg = EvalConfig(**base, out=str(tmp_path / "run"), methods=["gradcam", "legrad"], images_per_batch=2).resolved()
    ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shard), str(cfg.out))
    rows = read_metrics(cfg.out).to_pandas()
    assert sorted(rows["method"]) == ["gradcam", "gradcam", "legrad", "legrad"] and rows["error"].isna().all()
    assert rows.loc[rows["method"] == "legrad", "y"].notna().all()
    table, shape = read_maps_file(str(Path(str(cfg.out)) / "maps" / f"{shard.stem}.parquet"))
    stored = dict(zip(zip(table.column("key").to_pylist(), table.column("method").to_pylist(), strict=True),
                      map_array(table, shape), strict=True))
    for s in iter_samples(str(shard), loaded.input_size):
        x = s["image"][None]
        ours = explain(loaded, x, "legrad", targets=predict(loaded.model, x)[0]).maps[0].numpy()
        assert ours.max() - ours.min() > 0.99
        np.testing.assert_allclose(stored[(s["key"], "legrad")], ours, atol=2e-3)  # float16 as stored
