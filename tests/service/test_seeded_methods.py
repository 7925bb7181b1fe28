"""A seeded method (``CAM.seeded``: random, SS-CAM) in the job: the run's ``--seed`` reaches it, its rows
record it, the manifest's settings hold it, and its maps are the library's for that seed whatever the
batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from service_data import make_shards

from unioncam import explain, load
from unioncam.data.shards import iter_samples
from unioncam.engine import predict
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.results import map_array, provenance_of, read_maps_file
from unioncam.service.worker import ShardEvaluator


def evaluated(tmp_path: Path, out: str, **options: Any) -> tuple[EvalConfig, Any, dict[tuple[str, str], np.ndarray]]:
    shard = make_shards(tmp_path / "shards", n_images=3, shard_size=8)[0]
    cfg = EvalConfig(shards=str(shard), out=str(tmp_path / out), model="tiny_cnn", metrics=["ad"],
                     **options).resolved()
    ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shard), str(cfg.out))
    rows = read_metrics(cfg.out).to_pandas()
    table, shape = read_maps_file(str(Path(str(cfg.out)) / "maps" / f"{shard.stem}.parquet"))
    maps = dict(zip(zip(table.column("key").to_pylist(), table.column("method").to_pylist(), strict=True),
                    map_array(table, shape), strict=True))
    return cfg, rows, maps


def test_the_runs_seed_reaches_a_seeded_method_and_its_rows(tmp_path: Path) -> None:
    cfg, rows, maps = evaluated(tmp_path, "a", methods=["gradcam", "random"], seed=3, images_per_batch=1)
    assert cfg.identity()["seed"] == 3  # the manifest's settings: a rerun with another seed is refused
    metrics_file = next((Path(str(cfg.out)) / "metrics").glob("*.parquet"))
    assert provenance_of(str(metrics_file))["seed"] == 3  # a file read alone says which seed made it
    assert rows.loc[rows["method"] == "random", "seed"].tolist() == [3, 3, 3]
    assert rows.loc[rows["method"] == "gradcam", "seed"].isna().all()  # not a seeded method

    model = load("tiny_cnn").model
    shard = tmp_path / "shards" / "t-000000.tar"
    for s in iter_samples(str(shard), (64, 64)):
        x = s["image"][None]
        ours = explain(model, x, "random", targets=predict(model, x)[0], seed=3).maps[0].numpy()
        np.testing.assert_allclose(maps[(s["key"], "random")], ours, atol=1e-3)  # float16 as stored

    _, _, batched = evaluated(tmp_path, "b", methods=["random"], seed=3, images_per_batch=3)
    for key, method in batched:
        assert np.array_equal(batched[(key, method)], maps[(key, method)])  # batch size changes nothing
    _, _, other = evaluated(tmp_path, "c", methods=["random"], seed=4, images_per_batch=1)
    assert any(not np.array_equal(other[k], batched[k]) for k in other)


def test_the_seed_defaults_to_0_with_a_seeded_method_and_is_refused_without_one() -> None:
    assert EvalConfig(methods=["random"], model="tiny_cnn").resolved().seed == 0
    plain = EvalConfig(methods=["gradcam"], model="tiny_cnn").resolved()
    assert plain.seed is None and "seed" not in plain.identity()  # runs without seeded methods: as before
    with pytest.raises(ConfigError, match=r"^--seed only applies to the seeded methods \(random, sscam.*\), and "
                                          r"--methods has none"):
        EvalConfig(methods=["gradcam"], seed=1, model="tiny_cnn").resolved()
    for bad in (-1, 2**32):  # NumPy's RandomState takes [0, 2**32); the rows' column is int64
        with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
            EvalConfig(methods=["random"], seed=bad, model="tiny_cnn").resolved()
    assert EvalConfig.from_argv(["--methods", "random", "--seed", "7"], "imagenet").seed == 7


def test_a_file_written_before_a_column_was_declared_reads_it_as_nulls(tmp_path: Path) -> None:
    """The ``seed`` column came with the seeded methods: a metrics file without it (an earlier run) is
    read with nulls there, and ``unioncam verify``'s footer check does not ask for it."""
    from unioncam.service.results import metrics_schema, read_output, with_provenance, write_parquet
    from unioncam.service.rundir import _footer_problem

    full = metrics_schema()
    before = pa.schema([f for f in full if f.name != "seed"])
    row = dict.fromkeys(before.names) | {"key": "k", "shard": "s", "method": "gradcam", "y": 0.5, "o": 0.25}
    location = str(tmp_path / "metrics" / "s.parquet")
    write_parquet([row], with_provenance(before, {"run_id": "r", "shard_path": "s.tar"}), location)
    table, provenance = read_output(location, full)
    assert table.schema.names == full.names and table.column("seed").to_pylist() == [None]
    assert table.column("y").to_pylist() == [0.5] and provenance["run_id"] == "r"
    assert _footer_problem(location, "metrics", "s", "r", full, 1) is None
    missing_y = pa.schema([f for f in before if f.name != "y"])  # a column every file has: still damage
    write_parquet([{k: v for k, v in row.items() if k != "y"}], with_provenance(missing_y, {"run_id": "r"}), location)
    assert "lacks columns ['y']" in str(_footer_problem(location, "metrics", "s", "r", full, 1))
