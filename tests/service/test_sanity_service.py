"""--sanity in the service without Ray: one shard's sanity rows, their check on resume, the report's section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from service_data import make_shards

from unioncam.data.shards import iter_samples
from unioncam.evaluation.sanity import sanity_check
from unioncam.models import load
from unioncam.service import ConfigError, EvalConfig
from unioncam.service.report import write_report
from unioncam.service.results import provenance_of, read_parquet
from unioncam.service.rundir import verify_shard
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator


def test_sanity_rows_equal_the_library_and_reach_the_report(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", n_images=3, shard_size=8, bad=True)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam", "layercam"], metrics=["ad", "ai"], sanity=True, sanity_layers=2,
                     sanity_seed=7, images_per_batch=2).resolved()
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    ev = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id)
    counts = ev.evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    location = str(Path(str(cfg.out)) / "sanity" / f"{shards[0].stem}.parquet")
    rows = read_parquet(location).to_pandas()
    steps = rows["step"].nunique()
    assert counts["sanity"] == len(rows) == 3 * 2 * steps  # 3 decodable images × 2 methods × steps
    assert rows["error"].isna().all() and not rows["failed"].any()
    prov = provenance_of(location)
    assert prov["sanity_seed"] == 7 and prov["sanity_layers"] == 2 and len(prov["sanity_layer_seeds"]) > 0

    # the rows are unioncam.evaluation.sanity's on the same images, targets, seed and layers
    model = load("tiny_cnn").model
    samples = [s for s in iter_samples(str(shards[0]), (64, 64)) if "image" in s]
    x = torch.stack([s["image"] for s in samples])
    targets = rows.drop_duplicates("key").set_index("key").loc[[s["key"] for s in samples], "target"]
    ref = sanity_check(model, ["gradcam", "layercam"], x, torch.tensor(targets.to_numpy()), seed=7, layers=2)
    expect = pd.DataFrame(ref.rows())
    expect["key"] = [samples[i]["key"] for i in expect["image"]]
    got = rows.set_index(["key", "method", "step"]).sort_index()
    want = expect.set_index(["key", "method", "step"]).sort_index()
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got["spearman"], want["spearman"], atol=1e-6)
    np.testing.assert_allclose(got["ssim"], want["ssim"], atol=1e-6)
    assert (got.xs(0, level="step")["spearman"] > 0.999).all()  # nothing randomized yet

    # resume checks the sanity file as it checks the metrics file
    entry = manifest.data["shards"][shards[0].stem]
    assert verify_shard(str(cfg.out), shards[0].stem, manifest.run_id, entry, cfg.save_maps) is None
    Path(location).unlink()
    assert "sanity/" in str(verify_shard(str(cfg.out), shards[0].stem, manifest.run_id, entry, cfg.save_maps))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **ev.evaluate(str(shards[0]), str(cfg.out)))

    written = write_report(str(cfg.out), overlays=0)
    assert {"sanity"} <= set(written) and (Path(str(cfg.out)) / "report" / "sanity.png").is_file()
    table = pd.read_csv(written["sanity"])
    mean = rows[rows["step"] == rows["step"].max()].groupby("method")["spearman"].mean()
    last = table[table["step"] == table["step"].max()].set_index("method")
    np.testing.assert_allclose(last.loc[mean.index, "spearman"], mean.to_numpy(), atol=1e-9)
    text = (Path(str(cfg.out)) / "report" / "report.md").read_text()
    assert "## Sanity check: cascading model parameter randomization" in text and "seed 7" in text


def test_sanity_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="sanity_layers must be >= 1"):
        EvalConfig(sanity=True, sanity_layers=0).resolved()
    assert "sanity_seed" in EvalConfig(sanity=True).resolved().identity()
    assert "sanity_seed" not in EvalConfig().resolved().identity()  # inert without --sanity: no resume refused
    with pytest.raises(ConfigError, match="sanity_seed must be >= 0"):
        EvalConfig(sanity=True, sanity_seed=-1).resolved()
    parsed = EvalConfig.from_argv(["--sanity", "--sanity-layers", "3", "--sanity-seed", "4"], "imagenet")
    assert parsed.sanity and parsed.sanity_layers == 3 and parsed.sanity_seed == 4


def test_sanity_is_not_a_rescore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--sanity recomputes maps"):
        EvalConfig(rescore=str(tmp_path), sanity=True).resolved()
