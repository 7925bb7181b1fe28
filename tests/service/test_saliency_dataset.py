"""The saliency dataset: RUN_DIR/metrics/ and RUN_DIR/maps/ read by the tools people use.

Maps are stored as ``FixedSizeList<float16>[H·W]`` with the shape in the field metadata, so they
arrive as arrays (not opaque bytes) in pyarrow, pandas, DuckDB, Hugging Face ``datasets`` and Ray
Data; ``read_saliency`` and :class:`unioncam.service.SaliencyDataset` read them back as ``H×W``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from service_data import make_shards

from unioncam import read_saliency
from unioncam.service import EvalConfig, SaliencyDataset, read_metrics
from unioncam.service.worker import ShardEvaluator

METHODS = ["gradcam", "scorecam"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two shards (3 + 2 images, one of them undecodable) × 2 methods, evaluated without Ray."""
    root = tmp_path_factory.mktemp("saliency")
    shards = make_shards(root / "shards", n_images=4, shard_size=3, bad=False)
    cfg = EvalConfig(shards=str(root / "shards" / "*.tar"), out=str(root / "run"), model="tiny_cnn", methods=METHODS,
                     metrics=["ad"], report=False).resolved()
    ev = ShardEvaluator(cfg, "cpu", run_id="r1")
    for shard in shards:
        ev.evaluate(str(shard), cfg.out)
    return root / "run"


def expected(run_dir) -> tuple[list[tuple[str, str]], np.ndarray]:
    keys, methods, maps = read_saliency(run_dir)
    return list(zip(keys, methods, strict=True)), maps


def test_maps_are_fixed_size_float16_lists_with_their_shape(run_dir):
    field = pq.read_schema(run_dir / "maps" / "t-000000.parquet").field("map")
    assert str(field.type) == "fixed_size_list<element: halffloat>[4096]"
    assert json.loads(field.metadata[b"shape"]) == [64, 64]
    pairs, maps = expected(run_dir)
    assert len(pairs) == 4 * 2 and maps.shape == (8, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1


def test_pandas_pyarrow_dataset_and_duckdb_read_both_tables(run_dir):
    duckdb = pytest.importorskip("duckdb")
    pairs, maps = expected(run_dir)
    rows = read_metrics(run_dir).to_pandas()
    df = pd.read_parquet(run_dir / "metrics")
    assert len(df) == len(rows) == 8 and set(df["method"]) == set(METHODS)
    table = pads.dataset(run_dir / "metrics", format="parquet").to_table()
    assert table.num_rows == 8 and set(table.column_names) >= {"key", "y", "o", "error"}
    m = pd.read_parquet(run_dir / "maps").sort_values(["key", "method"]).reset_index(drop=True)
    assert list(zip(m["key"], m["method"], strict=True)) == pairs
    stacked = np.stack(m["map"].to_list()).astype(np.float32).reshape(-1, 64, 64)
    np.testing.assert_array_equal(stacked, maps)
    count = duckdb.sql(f"select count(*) from '{run_dir}/metrics/*.parquet' where error is null").fetchall()[0][0]
    assert count == 8
    first = duckdb.sql(f"select key, method, map from '{run_dir}/maps/*.parquet' order by key, method").fetchall()[0]
    np.testing.assert_allclose(np.array(first[2], dtype=np.float32).reshape(64, 64), maps[0], rtol=0, atol=0)


def test_hugging_face_datasets_reads_the_maps(run_dir):
    datasets = pytest.importorskip("datasets")
    pairs, maps = expected(run_dir)
    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "maps" / "*.parquet"), split="train")
    assert ds.num_rows == 8
    got = {(r["key"], r["method"]): np.array(r["map"], dtype=np.float32).reshape(64, 64) for r in ds}
    for i, pair in enumerate(pairs):
        np.testing.assert_array_equal(got[pair], maps[i])


def test_ray_data_reads_both_tables(cluster, run_dir):
    import ray

    pairs, maps = expected(run_dir)
    rows = ray.data.read_parquet(str(run_dir / "metrics")).take_all()
    assert len(rows) == 8 and all(r["y"] is not None for r in rows)
    got = {(r["key"], r["method"]): np.asarray(r["map"], dtype=np.float32).reshape(64, 64)
           for r in ray.data.read_parquet(str(run_dir / "maps")).take_all()}
    assert sorted(got) == sorted(pairs)
    for i, pair in enumerate(pairs):
        np.testing.assert_array_equal(got[pair], maps[i])


def test_read_saliency_refuses_unknown_methods_and_keys_alike(run_dir):
    with pytest.raises(KeyError, match=r"no maps for method 'nosuchmethod'; the run has gradcam, scorecam"):
        read_saliency(run_dir, method="nosuchmethod")
    with pytest.raises(KeyError, match=r"1 key\(s\) have no map for gradcam: \['nope'\]; the run's maps have "
                                       r"\d+ keys, e\.g\. \['"):
        read_saliency(run_dir, method="gradcam", keys=["nope"])
    keys, methods, maps = read_saliency(run_dir, method="scorecam", keys=[expected(run_dir)[0][0][0]])
    assert len(keys) == 1 and methods == ["scorecam"] and maps.shape == (1, 64, 64)


def test_a_torch_dataset_over_a_run(run_dir):
    pairs, maps = expected(run_dir)
    ds = SaliencyDataset(run_dir, method="gradcam")
    assert len(ds) == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    batches = list(loader)
    assert batches[0]["map"].shape == (3, 64, 64) and batches[0]["map"].dtype == torch.float32
    assert [k for b in batches for k in b["key"]] == [k for k, m in pairs if m == "gradcam"]
    got = torch.cat([b["map"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, maps[[i for i, (_, m) in enumerate(pairs) if m == "gradcam"]])
    rows = read_metrics(run_dir).to_pandas().set_index(["key", "method"])
    item = ds[1]
    assert item["y"] == pytest.approx(rows.loc[(item["key"], "gradcam"), "y"])
    assert item["label"] == rows.loc[(item["key"], "gradcam"), "label"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_maps_are_streamed_in_row_groups_and_read_back_whole(tmp_path):
    from unioncam.service.results import MAPS_ROW_GROUP, MapsWriter, maps_schema, with_provenance

    rng = np.random.default_rng(0)
    n = 2 * MAPS_ROW_GROUP + 7
    maps = rng.random((n, 8, 6)).astype(np.float16)
    schema = with_provenance(maps_schema((8, 6)), {"run_id": "r", "map_shape": [8, 6], "map_dtype": "float16"})
    writer = MapsWriter(schema)
    for i in range(n):
        writer.append({"key": f"k{i:04d}", "method": "gradcam", "rank": 1, "map": maps[i]})
        assert len(writer.pending) < MAPS_ROW_GROUP  # never more than one row group held
    (tmp_path / "maps").mkdir()
    writer.commit(str(tmp_path / "maps" / "s.parquet"))
    assert pq.ParquetFile(tmp_path / "maps" / "s.parquet").num_row_groups == 3
    keys, _, back = read_saliency(tmp_path)
    assert keys == [f"k{i:04d}" for i in range(n)]
    np.testing.assert_array_equal(back, maps.astype(np.float32))
    few = read_saliency(tmp_path, keys=["k0003", "k0518"])
    np.testing.assert_array_equal(few[2], maps[[3, 518]].astype(np.float32))


def test_read_saliency_opens_only_the_shards_it_is_given(run_dir, tmp_path):
    """The report picks a few keys out of a large run: with ``shards=`` no other maps file is opened
    (here another shard's file is garbage, and is never read)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "maps" / "t-000001.parquet").write_bytes(b"not parquet")
    rows = read_metrics(copy).to_pandas()
    key = rows[rows["shard"] == "t-000000"]["key"].iloc[0]
    keys, _, maps = read_saliency(copy, method="gradcam", keys=[key], shards=["t-000000"])
    assert keys == [key] and maps.shape == (1, 64, 64)
    with pytest.raises(Exception, match=r"(?i)parquet"):
        read_saliency(copy, method="gradcam", keys=[key])  # without shards=, every file is opened


def test_items_carry_every_scalar_column_the_methods_declare(tmp_path):
    """UnionCAM's β's and AMS branch and a seeded method's seed reach the items (schema-derived fields); a
    value a row lacks is -1 (integers), NaN (numbers) or "" (text), so the default collation batches them."""
    shards = make_shards(tmp_path / "shards", n_images=2, shard_size=2, bad=False)
    cfg = EvalConfig(shards=str(shards[0]), out=str(tmp_path / "run"), model="tiny_cnn", methods=["random", "unioncam"],
                     metrics=["ad"], seed=5, report=False).resolved()
    ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shards[0]), cfg.out)
    ds = SaliencyDataset(cfg.out)
    assert {"seed", "beta_den", "beta_reg", "beta_dereg", "selected", "seconds", "epg"} <= set(ds.fields)
    assert "error" not in ds.fields and "road_morf" not in ds.fields  # null in kept rows / a list column
    rows = read_metrics(cfg.out).to_pandas().set_index(["key", "method"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    for i, (key, method) in enumerate(zip(batch["key"], batch["method"], strict=True)):
        row = rows.loc[(key, method)]
        assert int(batch["seed"][i]) == (5 if method == "random" else -1)
        if method == "unioncam":
            assert float(batch["beta_den"][i]) == pytest.approx(row["beta_den"]) and batch["selected"][i] == \
                row["selected"]
        else:
            assert torch.isnan(batch["beta_den"][i]) and batch["selected"][i] == ""
        assert torch.isnan(batch["epg"][i])  # no boxes
