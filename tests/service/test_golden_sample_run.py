"""The sample run's rows and maps are those recorded before the service renovation (issue 24).

``tests/golden/sample_*_before_renovation.json`` were written from runs of commit f3a8431 (before the
metric registry, the engine, the run directory object and the worker pool) over the bundled sample:
``jobs/eval_imagenet.py --methods <the papers' 7>`` (EfficientNet-Lite0, AD/AI, insertion/deletion at
32 steps, EPG) and ``jobs/eval_voc.py --methods gradcam,unioncam --metrics all`` (with ROAD and EPG
on VOC's boxes). Per row they keep the target, label, Y, O, AUCs, EPG, ROAD, β's, AMS branch and
error; per map its mean over an 8×8 grid of blocks. This test computes the first image of each again
with today's worker (no Ray: the computation is the worker's) and compares."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unioncam.data.sample import write_sample_shards
from unioncam.service.config import EvalConfig
from unioncam.service.results import map_array, read_maps_file, read_parquet
from unioncam.service.worker import ShardEvaluator

DATA = Path(__file__).resolve().parents[1] / "golden"
PAPERS = "gradcam,gradcampp,xgradcam,layercam,scorecam,unioncam,integrativecam"
RUNS = {  # the recorded run's flags, as it was run
    "imagenet": ["--methods", PAPERS],
    "voc": ["--methods", "gradcam,unioncam", "--metrics", "all"],
}
ROW_ATOL = 1e-5  # Y, O, AUCs, EPG, ROAD, β's (float64 in the rows; thread counts may reorder sums)
MAP_ATOL = 2e-3  # an 8×8 block mean of a float16 map in [0, 1] (float16 steps are ≤ 4.9e-4)


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= ROW_ATOL
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(RUNS))
def test_the_sample_run_is_what_it_was_before_the_renovation(tmp_path: Path, dataset: str) -> None:
    path = DATA / f"sample_{dataset}_before_renovation.json"
    if not path.exists():
        pytest.fail(f"{path.name} is missing")
    golden = json.loads(path.read_text())
    write_sample_shards(tmp_path / "sample")
    shard = tmp_path / "sample" / dataset / f"sample-{dataset}-000000.tar"
    cfg = EvalConfig.from_argv(["--shards", str(shard), "--out", str(tmp_path / "run"), "--model", "efficientnet_lite0",
                                "--insdel-steps", "32", "--limit", "1", *RUNS[dataset]],  # 1 image: CI time
                               dataset)  # type: ignore[arg-type]
    ShardEvaluator(cfg, "cpu", run_id="golden").evaluate(str(shard), str(cfg.out), limit=cfg.limit)

    rows = read_parquet(str(tmp_path / "run" / "metrics" / f"{shard.stem}.parquet")).to_pylist()
    assert rows and {r["method"] for r in rows} == set(cfg.methods)
    assert len({r["key"] for r in rows}) == 1  # the limit (CI time)
    differ = []
    for row in rows:
        then = golden["rows"][f"{row['key']}|{row['method']}|{row['rank']}"]
        differ += [(row["key"], row["method"], c, then[c], row[c]) for c in then if not _close(then[c], row[c])]
    assert not differ, differ[:10]

    table, shape = read_maps_file(str(tmp_path / "run" / "maps" / f"{shard.stem}.parquet"))
    maps = map_array(table, shape).astype(np.float64)
    assert len(maps) == len(rows)
    h, w = shape
    for key, method, rank, m in zip(*(table.column(c).to_pylist() for c in ("key", "method", "rank")), maps,
                                    strict=True):
        pooled = m.reshape(8, h // 8, 8, w // 8).mean(axis=(1, 3))
        then = np.array(golden["maps"][f"{key}|{method}|{rank}"]["pooled8"])
        np.testing.assert_allclose(pooled, then, atol=MAP_ATOL, err_msg=f"{key} {method}")
