"""The service without Ray: config, one shard's rows and maps, error rows, report arithmetic."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from service_data import make_shards, softmax_prob

from unioncam import explain, load, read_saliency
from unioncam.data.shards import iter_samples
from unioncam.methods import METHODS as REGISTERED
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.config import build_parser
from unioncam.service.report import write_report
from unioncam.service.results import metrics_schema, provenance_of
from unioncam.service.worker import ShardEvaluator

METHODS = ["gradcam", "scorecam", "unioncam"]


def config(tmp_path, **kw) -> EvalConfig:
    base = {"shards": str(tmp_path / "shards" / "*.tar"), "out": str(tmp_path / "run"), "model": "tiny_cnn",
            "methods": METHODS, "insdel_steps": 8}
    return EvalConfig(**{**base, **kw}).resolved()


# -- config ------------------------------------------------------------------------------------
def test_yaml_config_with_flag_overrides(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("shards: /data/val-{000000..000009}.tar\nout: /runs/a\nmodel: tiny-cnn\n"
                        "methods: unioncam,gradcam\nmetrics: [ad, ai]\nbatch-size: 16\nprecision: bf16\n")
    cfg = EvalConfig.from_argv(["--config", str(cfg_file), "--batch-size", "32", "--methods", "gradcam"], "imagenet")
    assert (cfg.model, cfg.methods, cfg.metrics, cfg.batch_size, cfg.precision) == (
        "tiny_cnn", ["gradcam"], ["ad", "ai"], 32, "bf16")
    assert cfg.insdel_steps == 224 and cfg.target == "predicted" and not cfg.is_sample


def test_no_arguments_means_the_sample_with_lite0():
    cfg = EvalConfig.from_argv([], "voc")
    assert cfg.is_sample and cfg.model == "efficientnet_lite0" and cfg.out == "runs/sample-voc"
    assert cfg.shards == "datasets/sample/voc/sample-voc-*.tar" and cfg.insdel_steps == 32
    assert cfg.methods == ["gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "unioncam", "integrativecam"]


@pytest.mark.parametrize(("values", "message"), [
    ({"methods": ["unioncm"]}, "did you mean 'unioncam'"),
    ({"metrics": ["ad", "auc"]}, "unknown metric(s) auc"),
    ({"shards": "x/*.tar", "out": None}, "--out RUN_DIR is required"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"weights": "/no/such.pth"}, "weights file not found"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
])
def test_bad_options_say_what_is_wrong(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalConfig(**{"shards": "x/*.tar", "out": "o", **values}).resolved()


def test_bad_yaml_values_get_config_errors(tmp_path):
    """A YAML file bypasses argparse's choices: the config itself names the bad value and the valid ones."""
    with pytest.raises(ConfigError, match=r"unknown precision 'fp8'; valid: auto, fp32, tf32, bf16, fp16"):
        EvalConfig.from_dict({"precision": "fp8"}).resolved()
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) auc; valid: ad, ai, insdel, epg, road"):
        EvalConfig.from_dict({"metrics": "ad, auc"}).resolved()
    cfg = EvalConfig.from_dict({"methods": " ALL ", "metrics": "all"}).resolved()
    assert cfg.metrics == ["ad", "ai", "insdel", "epg", "road"] and cfg.methods == REGISTERED.names()
    default = EvalConfig().resolved()
    assert default.metrics == ["ad", "ai", "insdel", "epg"]  # the default leaves ROAD out
    assert default.methods == ["gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "unioncam",
                               "integrativecam"]  # the papers' seven; "all" is every registered method


def test_unknown_yaml_key_is_rejected(tmp_path):
    (tmp_path / "c.yaml").write_text("shard: a.tar\n")
    with pytest.raises(ConfigError, match=r"unknown config key.*shard.*valid:.*shards"):
        EvalConfig.from_yaml(tmp_path / "c.yaml")


def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("methods: gradcam\nmodel: tiny_cnn\nmethods: scorecam\n")
    with pytest.raises(ConfigError, match=r"key 'methods' is given twice \(lines 1 and 3\)"):
        EvalConfig.from_yaml(path)


@pytest.mark.parametrize("flags", [["--sanity-layers", "2"], ["--sanity-seed", "3"], ["--sanity-seed", "0"]])
def test_sanity_options_without_sanity_are_refused(flags, capsys):
    from unioncam.cli import main as cli

    with pytest.raises(ConfigError, match=r"only apply with --sanity"):
        EvalConfig.from_argv(flags, "imagenet")
    assert cli(["eval", "--dataset", "imagenet", *flags]) == 2  # before Ray: one line
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert EvalConfig.from_argv(["--sanity", *flags], "imagenet").sanity_seed == (int(flags[1]) if "seed" in flags[0]
                                                                                 else 0)


def test_the_driver_checks_the_model_before_any_worker_starts(tmp_path, monkeypatch, capfd):
    """Missing weights, mismatched weights and a top-K beyond the model's classes are one line
    (ConfigError) from the driver; Ray is never started (runner.connect is not reached)."""
    from unioncam.service import runner

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(runner, "connect", no_ray)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached torchvision weights
    shards = make_shards(tmp_path / "shards", n_images=1, shard_size=1)
    base = {"shards": str(shards[0]), "methods": ["gradcam"], "metrics": ["ad"], "report": False}
    with pytest.raises(ConfigError, match=r"^no weights for torchvision:resnet18: pass --weights"):
        runner.run(EvalConfig(**base, model="torchvision:resnet18", out=str(tmp_path / "a")).resolved())
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ConfigError, match=r"does not match the architecture of TinyCNN: \d+ keys missing"):
        runner.run(EvalConfig(**base, model="tiny_cnn", weights=str(wrong), out=str(tmp_path / "b")).resolved())
    with pytest.raises(ConfigError, match=r"--target topk:11 asks for more classes than tiny_cnn has \(10\)"):
        runner.run(EvalConfig(**base, model="tiny_cnn", target="topk:11", out=str(tmp_path / "c")).resolved())
    torch.manual_seed(0)  # a model CAM cannot explain (no pooling + linear head): one line naming both
    squeeze = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), squeeze)
    with pytest.raises(ConfigError, match=r"^cam: model SqueezeNet has no linear classifier layer.*; run the job "
                                          r"without cam \(--methods lists the others\)$"):
        runner.run(EvalConfig(**{**base, "methods": ["gradcam", "cam"]}, model="torchvision:squeezenet1_1",
                              weights=str(squeeze), out=str(tmp_path / "d")).resolved())
    with pytest.raises(ConfigError, match=r"^legrad: model SqueezeNet has no transformer block .*; run the job "
                                          r"without legrad"):  # named on its own: refused
        runner.run(EvalConfig(**{**base, "methods": ["gradcam", "legrad"]}, model="torchvision:squeezenet1_1",
                              weights=str(squeeze), out=str(tmp_path / "e")).resolved())
    assert not any((tmp_path / d / "lock.json").exists() for d in "abcde")  # refused before the lock, too
    # named through a family (or "all"): left out with a line, and the run goes on to start Ray
    cfg = EvalConfig(**{**base, "methods": ["activation", "gradcam"]}, model="torchvision:squeezenet1_1",
                     weights=str(squeeze), out=str(tmp_path / "f")).resolved()
    assert cfg.methods == ["eigencam", "random", "cam", "kpcacam", "gradcam"]
    assert cfg.methods_optional == cfg.methods[:4]
    loaded, checked = runner.check_model(cfg)
    assert checked.methods == ["eigencam", "random", "kpcacam", "gradcam"] and loaded.name.endswith("squeezenet1_1")
    assert "leaving out cam (from a group in --methods), which cannot explain torchvision:squeezenet1_1: cam: model " \
        "SqueezeNet has no linear classifier layer" in capfd.readouterr().out
    with pytest.raises(AssertionError, match="Ray must not start"):
        runner.run(cfg)


# -- one shard -----------------------------------------------------------------------------------
@pytest.fixture
def shard_dir(tmp_path):
    return make_shards(tmp_path / "shards", n_images=5, shard_size=8, boxes=True, bad=True)


def test_shard_rows_maps_and_metrics_match_an_independent_recomputation(tmp_path, shard_dir):
    cfg = config(tmp_path, images_per_batch=2)
    ev = ShardEvaluator(cfg, "cpu", run_id="r1")
    counts = ev.evaluate(str(shard_dir[0]), cfg.out)
    rows = read_metrics(cfg.out).to_pandas()
    keys = [k for k in rows["key"].unique()]
    st = shard_dir[0].stat()
    files = {}
    for folder in ("metrics", "maps"):  # each output's record: its size, the sha256 of its bytes, its stamp
        path = Path(cfg.out) / folder / "t-000000.parquet"
        files[folder] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                         "stamp": f"{path.stat().st_size}:{path.stat().st_mtime_ns}"}
    assert counts == {"images": 8, "rows": 8 * 3, "maps": 8 * 3 - 3 * 3, "errors": 3 * 3, "seconds": counts["seconds"],
                      "compiled_graphs": 0, "files": files,
                      "source": {"uri": str(shard_dir[0]), "bytes": st.st_size,
                                 "stamp": f"{st.st_size}:{st.st_mtime_ns}",
                                 "sha256": hashlib.sha256(shard_dir[0].read_bytes()).hexdigest()}}
    assert len(keys) == 8 and len(rows) == 24 and not rows.duplicated(["key", "method"]).any()

    good = rows[rows["error"].isna()]
    assert set(good["key"]) == {k for k in keys if k not in ("corrupt", "unlabelled", "badlabel")}
    errors = rows[rows["error"].notna()].groupby("key")["error"].first()
    assert "cannot decode corrupt.jpg" in errors["corrupt"]
    assert "missing label" in errors["unlabelled"] and "bad label" in errors["badlabel"]

    # Recompute every good row from scratch: images decoded here, maps from explain(), f_c by hand.
    loaded = load("tiny_cnn")
    from unioncam.data.shards import iter_samples

    samples = {s["key"]: s for s in iter_samples(str(shard_dir[0]), (64, 64)) if "image" in s}
    x = torch.stack([samples[k]["image"] for k in sorted(samples)])
    keys_sorted = sorted(samples)
    got_keys, got_methods, got_maps = read_saliency(cfg.out)
    assert got_keys == sorted(keys_sorted * 3) and got_methods == METHODS * 5 and got_maps.shape == (15, 64, 64)
    for method in METHODS:
        exp = explain(loaded, x, method, batch_size=8)
        k, _, maps = read_saliency(cfg.out, method=method, keys=keys_sorted)
        assert k == keys_sorted
        np.testing.assert_allclose(maps, exp.maps.numpy(), atol=1e-3)  # float16 storage
        for i, key in enumerate(keys_sorted):
            row = good[(good["key"] == key) & (good["method"] == method)].iloc[0]
            target = int(exp.targets[i])
            assert row["target"] == target and row["target_name"] == f"class_{target}"
            assert row["label"] == samples[key]["label"] and row["label_name"] == f"class_{int(row['label'])}"
            assert row["y"] == pytest.approx(softmax_prob(loaded.model, x[i], target), rel=1e-5)
            masked = exp.maps[i][None] * x[i]
            assert row["o"] == pytest.approx(softmax_prob(loaded.model, masked, target), rel=1e-4)
            m = exp.maps[i].double()
            sy, sx = 64 / 80, 64 / 96  # boxes were drawn on the 96×80 photo
            ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
            box = (xs >= 20 * sx) & (xs < 76 * sx) & (ys >= 16 * sy) & (ys < 64 * sy)
            if samples[key]["orig_size"] == (80, 96):
                energy = float(m[box].sum() / m.sum()) if m.sum() > 0 else 0.0  # documented: no energy → 0
                assert row["epg"] == pytest.approx(energy, rel=1e-5)
            if method == "unioncam":
                assert row["selected"] in ("dereg", "region") and np.isfinite(row["beta_reg"])
            else:
                assert pd.isna(row["selected"]) and np.isnan(row["beta_reg"])
            assert 0 <= row["insertion_auc"] <= 1 and 0 <= row["deletion_auc"] <= 1 and row["seconds"] >= 0


@pytest.mark.parametrize("limit", [None, 2])
def test_a_worker_reads_its_shard_once_and_records_its_whole_hash(tmp_path, shard_dir, monkeypatch, limit):
    from unioncam import storage
    from unioncam.service import worker

    cfg = config(tmp_path, methods=["gradcam"], metrics=["ad"], limit=limit)
    ev = ShardEvaluator(cfg)
    opened: list[str] = []
    real = storage.open_input
    monkeypatch.setattr(storage, "open_input", lambda p: opened.append(p) or real(p))
    assert worker.storage is storage
    counts = ev.evaluate(str(shard_dir[0]), cfg.out)
    assert opened == [str(shard_dir[0])]  # decoded and hashed in one read (a limit reads the rest to hash it)
    assert counts["source"]["sha256"] == hashlib.sha256(shard_dir[0].read_bytes()).hexdigest()
    assert provenance_of(str(Path(cfg.out) / "metrics" / "t-000000.parquet"))["source"]["sha256"] == \
        counts["source"]["sha256"]


def test_scorecam_taken_from_unioncam_equals_scorecam_alone(tmp_path, shard_dir):
    both = config(tmp_path, out=str(tmp_path / "both"), methods=["scorecam", "unioncam"], metrics=["ad"])
    alone = config(tmp_path, out=str(tmp_path / "alone"), methods=["scorecam"], metrics=["ad"])
    ev_both = ShardEvaluator(both)
    assert ev_both.provided == {"scorecam": ("unioncam", "region_map")} and "scorecam" not in ev_both.cams
    ev_both.evaluate(str(shard_dir[0]), both.out)
    ShardEvaluator(alone).evaluate(str(shard_dir[0]), alone.out)
    k1, _, m1 = read_saliency(both.out, method="scorecam")
    k2, _, m2 = read_saliency(alone.out, method="scorecam")
    assert k1 == k2 and len(k1) == 5
    np.testing.assert_array_equal(m1, m2)
    o1 = read_metrics(both.out).to_pandas().query("method == 'scorecam'")["o"].to_numpy()
    o2 = read_metrics(alone.out).to_pandas()["o"].to_numpy()
    np.testing.assert_allclose(o1, o2, rtol=1e-6)


def test_the_service_takes_what_a_registered_method_declares(tmp_path, shard_dir, monkeypatch):
    """A new method is one class and one registration: the service learns from its declarations which
    of its details become row columns and whose maps it computes along the way (that method is then
    not run), and counts its masked forwards, without naming it."""
    from unioncam.methods import CAM, METHODS, GradCAM
    from unioncam.ops import normalize, upsample

    class Toy(CAM):
        """1 − Grad-CAM's map; Grad-CAM's own map on the way (``plain``), and its AMS-like branch."""

        name = "toycam"
        row_details: ClassVar[dict[str, str]] = {"selected": "string"}
        provides: ClassVar[dict[str, str]] = {"gradcam": "plain"}

        def compute(self, images, targets, acts, grads, logits):
            raw = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1).clamp_min(0)
            plain = normalize(upsample(raw, (images.shape[-2], images.shape[-1])))  # at input size, as maps
            return 1 - plain, {"plain": plain, "selected": ["toy"] * images.shape[0]}

    def refuse(*_: object) -> None:
        raise AssertionError("gradcam must be taken from toycam, not run")

    monkeypatch.setitem(METHODS._items, "toycam", ("toycam", Toy))
    cfg = config(tmp_path, out=str(tmp_path / "toy"), methods=["toycam", "gradcam"], metrics=["ad"])
    alone = config(tmp_path, out=str(tmp_path / "alone"), methods=["gradcam"], metrics=["ad"])
    ShardEvaluator(alone).evaluate(str(shard_dir[0]), alone.out)
    monkeypatch.setattr(GradCAM, "compute", refuse)
    ev = ShardEvaluator(cfg)
    assert ev.provided == {"gradcam": ("toycam", "plain")} and list(ev.cams) == ["toycam"]
    ev.evaluate(str(shard_dir[0]), cfg.out)
    rows = read_metrics(cfg.out).to_pandas()
    good = rows[rows["error"].isna()]
    assert set(good["method"]) == {"toycam", "gradcam"} and len(good) == 10
    assert (good.loc[good["method"] == "toycam", "selected"] == "toy").all()  # its row detail, a column
    assert good.loc[good["method"] == "gradcam", "selected"].isna().all()
    _, _, mine = read_saliency(cfg.out, method="gradcam")
    _, _, plain = read_saliency(alone.out, method="gradcam")
    np.testing.assert_allclose(mine, plain, atol=1e-3)  # float16 maps of the same Grad-CAM
    _, _, toy = read_saliency(cfg.out, method="toycam")
    np.testing.assert_allclose(toy, 1 - mine, atol=2e-3)


def test_a_method_failing_on_one_image_costs_only_that_image(tmp_path, shard_dir):
    cfg = config(tmp_path, methods=["gradcam", "layercam"], metrics=["ad"], images_per_batch=5)
    ev = ShardEvaluator(cfg)
    real = ev.cams["gradcam"]

    class Flaky:
        def __call__(self, x, targets):
            if bool((x.flatten(1).mean(1) > 0.45).any()):
                raise RuntimeError("simulated failure on a bright image")
            return real(x, targets)

        def __getattr__(self, name):  # the rest (its forwards for progress, ...) is the real method's
            return getattr(real, name)

    ev.cams["gradcam"] = Flaky()
    ev.evaluate(str(shard_dir[0]), cfg.out)
    rows = read_metrics(cfg.out).to_pandas()
    samples = [s for s in __import__("unioncam.data.shards", fromlist=["x"]).iter_samples(str(shard_dir[0]), (64, 64))
               if "image" in s]
    bright = {s["key"] for s in samples if float(s["image"].mean()) > 0.45}
    assert 0 < len(bright) < 5  # the test needs both kinds
    grad = rows[(rows["method"] == "gradcam") & ~rows["key"].isin(["corrupt", "unlabelled", "badlabel"])]
    assert set(grad.loc[grad["error"].notna(), "key"]) == bright
    assert grad.loc[grad["error"].notna(), "error"].str.contains("simulated failure").all()
    assert grad.loc[grad["error"].isna(), "y"].notna().all()
    assert rows[rows["method"] == "layercam"]["error"].notna().sum() == 3  # only the broken samples


def test_label_targets_and_voc_labels_refused_for_another_models_classes(tmp_path):
    make_shards(tmp_path / "shards", n_images=3, shard_size=3)
    cfg = config(tmp_path, methods=["gradcam"], metrics=["ad"], target="label")
    ShardEvaluator(cfg).evaluate(str(tmp_path / "shards" / "t-000000.tar"), cfg.out)
    rows = read_metrics(cfg.out).to_pandas().set_index("key")
    assert (rows["target"] == rows["label"]).all() and rows["rank"].isna().all()
    assert rows["label_name"].iloc[0] == "class_0" and rows["target_name"].iloc[0] == "class_0"
    # VOC's label 7 is "cat"; an ImageNet model's class 7 is "cock": refused before anything runs.
    with pytest.raises(ConfigError, match=r"--target label with VOC shards: vgg16 is not a model of VOC.s 20 classes"):
        EvalConfig(shards="x/*.tar", out="o", dataset="voc", target="label").resolved()
    with pytest.raises(ValueError, match="needs a model of VOC's 20 classes; tiny_cnn has 10"):
        ShardEvaluator(dataclasses.replace(cfg, dataset="voc"))


def test_topk_targets_give_k_rows_per_image_with_ranks(tmp_path):
    make_shards(tmp_path / "shards", n_images=2, shard_size=2)
    cfg = config(tmp_path, methods=["gradcam", "scorecam"], metrics=["ad"], target="topk:3")
    ev = ShardEvaluator(cfg)
    ev.evaluate(str(tmp_path / "shards" / "t-000000.tar"), cfg.out)
    rows = read_metrics(cfg.out).to_pandas()
    assert len(rows) == 2 * 2 * 3 and rows["error"].isna().all()
    for (_key, _method), part in rows.groupby(["key", "method"]):
        assert part["rank"].tolist() == [1, 2, 3]
    for key, part in rows[rows["method"] == "gradcam"].groupby("key"):
        x = next(s for s in iter_samples(str(tmp_path / "shards" / "t-000000.tar"), (64, 64)) if s["key"] == key)
        with torch.no_grad():
            expected = ev.model(x["image"][None])[0].topk(3).indices.tolist()
        assert part.sort_values("rank")["target"].tolist() == expected
        assert part.sort_values("rank")["y"].is_monotonic_decreasing  # Y is the softmax of the k-th class
    keys, _, maps = read_saliency(cfg.out, method="gradcam")  # rank 1 by default
    assert len(keys) == 2 and maps.shape == (2, 64, 64)
    assert len(read_saliency(cfg.out, method="gradcam", rank=None)[0]) == 6
    with pytest.raises(ConfigError, match="'topk:K' with K >= 1, got 'topk:0'"):
        EvalConfig(shards="x/*.tar", out="o", target="topk:0").resolved()


def test_provenance_in_schema_metadata(tmp_path, shard_dir):
    cfg = config(tmp_path, methods=["gradcam"], metrics=["ad"])
    ShardEvaluator(cfg, run_id="run42").evaluate(str(shard_dir[0]), cfg.out)
    meta = provenance_of(tmp_path / "run" / "metrics" / "t-000000.parquet")
    assert meta["schema_version"] == 3 and meta["run_id"] == "run42" and meta["model"] == "tiny_cnn"
    assert meta["target_layer"] == "features.4" and meta["input_size"] == [64, 64] and meta["precision"] == "fp32"
    assert meta["torch_version"] == torch.__version__ and meta["weights_sha256"] is None
    maps_meta = provenance_of(tmp_path / "run" / "maps" / "t-000000.parquet")
    assert maps_meta["map_shape"] == [64, 64] and maps_meta["map_dtype"] == "float16"
    assert pq.read_schema(tmp_path / "run" / "metrics" / "t-000000.parquet").names == metrics_schema().names
    with pytest.raises(KeyError, match="1 key"):
        read_saliency(cfg.out, keys=["nope"])


# -- report --------------------------------------------------------------------------------------
def test_report_numbers_are_the_rows_own_averages(tmp_path, shard_dir):
    cfg = config(tmp_path, metrics=["ad", "ai", "insdel", "epg"])
    ShardEvaluator(cfg).evaluate(str(shard_dir[0]), cfg.out)
    paths = write_report(cfg.out, overlays=2)
    summary = pd.read_csv(paths["summary"]).set_index("method")
    rows = pq.read_table(tmp_path / "run" / "metrics" / "t-000000.parquet").to_pandas()
    for method in METHODS:
        r = rows[(rows["method"] == method) & rows["error"].isna()]
        y, o = r["y"].to_numpy(), r["o"].to_numpy()
        drops = [100 * max(0.0, a - b) / a for a, b in zip(y, o, strict=True)]
        assert summary.loc[method, "average_drop"] == pytest.approx(sum(drops) / len(drops), abs=1e-9)
        assert summary.loc[method, "average_increase"] == pytest.approx(100 * np.mean(y < o), abs=1e-9)
        ad = summary.loc[method, ["ad_ci_low", "average_drop", "ad_ci_high"]].to_numpy()
        assert ad[0] <= ad[1] <= ad[2]
        assert summary.loc[method, "insertion_auc"] == pytest.approx(r["insertion_auc"].mean())
        assert summary.loc[method, "epg"] == pytest.approx(r["epg"].mean())
        assert (summary.loc[method, "n"], summary.loc[method, "errors"]) == (5, 3)
    per_class = pd.read_csv(paths["per_class"])
    assert set(per_class["class"]) == {f"class_{i}" for i in range(5)} and (per_class["n"] == 1).all()
    html = Path(paths["html"]).read_text()
    assert "Average Drop" in html and "unioncam" in html and "overlays.png" in html
    for png in ("ad_ai.png", "distributions.png", "overlays.png"):
        assert (tmp_path / "run" / "report" / png).stat().st_size > 1000
    assert "cannot decode corrupt.jpg" in Path(paths["markdown"]).read_text()
    assert json.loads(json.dumps(list(summary.index))) == METHODS


# -- cluster/ -------------------------------------------------------------------------------------
def test_cluster_manifests_run_a_valid_job_command():
    """The commands in cluster/rayjob.yaml and cluster.yaml parse as the job's own flags."""
    import shlex
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2] / "cluster"
    rayjob = yaml.safe_load((root / "rayjob.yaml").read_text())
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/eval_imagenet.py"] and (root.parent / argv[1]).is_file()
    parsed = build_parser("imagenet").parse_args(argv[2:])  # weights are on the cluster: parse, don't resolve
    assert (parsed.model, parsed.gpus_per_worker, parsed.methods) == ("vgg16", 1.0, "all")
    # What other nodes open is a URI (or an absolute path), never relative to the submitter's directory.
    assert all(v.startswith("s3://") for v in (parsed.shards, parsed.out, parsed.weights))
    spec = rayjob["spec"]["rayClusterSpec"]
    # K8sJobMode: the submitter pod and the operator reach the dashboard through the head Service.
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in (head, workers):  # object-storage credentials from a Secret, never in the manifest
        assert pod["envFrom"] == [{"secretRef": {"name": "unioncam-s3"}}] and "AWS_SECRET_ACCESS_KEY" not in str(pod)
    launcher = yaml.safe_load((root / "cluster.yaml").read_text())
    assert "--dashboard-host=127.0.0.1" in launcher["head_start_ray_commands"][1]  # reached through an SSH tunnel
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token reaches every node
    assert all("RAY_AUTH_MODE=token ray start" in c for c in (launcher["head_start_ray_commands"][1],
                                                               launcher["worker_start_ray_commands"][1]))
    assert launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_a_shard_shorter_than_its_manifest_gets_an_error_record(tmp_path):
    import tarfile

    make_shards(tmp_path / "shards", 6, 6)
    path = tmp_path / "shards" / "t-000000.tar"
    with tarfile.open(path) as tar:  # a well-formed tar that holds only the first 3 samples
        keep = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:9]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in keep:
            tar.addfile(member, __import__("io").BytesIO(data))
    evaluator = ShardEvaluator(config(tmp_path, methods=["gradcam"]), "cpu", run_id="r")
    counts = evaluator.evaluate(str(path), str(tmp_path / "run"), expected=6)
    rows = read_metrics(tmp_path / "run").to_pandas()
    assert counts["images"] == 3 and counts["errors"] == 1
    missing = rows[rows["error"].notna()]
    assert list(missing["key"]) == ["t-000000:missing"]
    assert "ends after 3 samples; its manifest lists 6" in missing["error"].iloc[0]
