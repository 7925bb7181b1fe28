"""Bad configuration, broken run directories, unsafe weights and hostile text: one-line errors."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from unioncam.models import WeightsError, load
from unioncam.service import ConfigError, EvalConfig
from unioncam.service.rundir import load_manifest
from unioncam.service.runner import main as job_main


def yaml_config(tmp_path, text: str) -> EvalConfig:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return EvalConfig.from_argv(["--config", str(path)], "imagenet")


@pytest.mark.parametrize(("text", "message"), [
    ('batch_size: "32"\n', "'batch_size' must be an integer, got '32'"),
    ("channels_last: \"no\"\n", "'channels_last' must be true or false"),
    ("fuse: 1\n", "'fuse' must be true or false"),
    ("workers: 2.5\n", "'workers' must be an integer, got 2.5"),
    ("workers: true\n", "'workers' must be an integer"),
    ("insdel_steps: 0\n", "insdel_steps must be >= 1"),
    ("batch_size: 0\n", "batch_size must be >= 1"),
    ("batch-size: 8\nbatch_size: 16\n", "given twice"),
    ("sample: true\nshards: x/*.tar\nout: o\n", "exclude each other"),
    ("progress_interval: 0\n", "progress_interval must be > 0"),
    ("shards: x/*.tar\nout: /\n", "--out /"),
    ("a: &a [1, 1, 1]\nb: &b [*a, *a, *a]\nsave_maps: [*b, *b, *b]\n", "anchors or aliases"),
    ("gpus_per_worker: 4\n", "computes on one GPU"),
])
def test_yaml_values_are_checked_in_one_place(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        yaml_config(tmp_path, text)


def test_oversized_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="over 1048576 bytes"):
        yaml_config(tmp_path, "# x\n" * 300_000)
    with pytest.raises(ConfigError, match="over 1048576 bytes"):  # a file that never ends: read up to the cap
        EvalConfig.from_yaml("/dev/zero")


def test_nan_and_negative_resources_are_refused_before_ray_starts():
    cases = (("cpus_per_worker", float("nan"), "finite"), ("gpus_per_worker", float("nan"), "finite"),
             ("max_restarts", -5, ">= 0"), ("max_task_retries", -2, ">= 0"), ("start_timeout", float("inf"), "finite"))
    for key, value, message in cases:
        with pytest.raises(ConfigError, match=f"{key} must be .*{message}"):
            EvalConfig(shards="x/*.tar", out="o", **{key: value}).resolved()


def test_a_config_for_another_dataset_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text("dataset: imagenet\n")
    with pytest.raises(ConfigError, match="says dataset: imagenet, but this entry point evaluates voc"):
        EvalConfig.from_argv(["--config", str(tmp_path / "job.yaml"), "--shards", "x/*.tar", "--out", "o"], "voc")


def test_eval_voc_with_a_config_without_dataset_stays_voc(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("methods: gradcam\n")
    assert EvalConfig.from_argv(["--config", str(path)], "voc").dataset == "voc"
    assert EvalConfig.from_argv(["--config", str(path)], "voc").shards == "datasets/sample/voc/sample-voc-*.tar"


@pytest.mark.parametrize(("content", "message"), [
    ("{\n", "is not valid JSON"),
    ('{"run_id": "x", "config": {}, "shards": []}', "'shards' is missing or not a dict"),
    ('{"config": {}, "shards": {}}', "'run_id' is missing"),
    ('{"run_id": "x", "config": {}, "shards": {"a": {"status": "done", "rows": "7"}}}', "shard 'a' is malformed"),
    ('{"format": "unioncam-shards/1", "shards": []}', "is a shard folder"),
])
def test_hand_edited_manifests_get_one_line_errors(tmp_path, content, message, capsys):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_manifest(str(tmp_path))
    from unioncam.cli import main

    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.strip("'") in err[0]


def test_job_refuses_a_shard_folder_as_out(tmp_path, capsys):
    from service_data import make_shards

    make_shards(tmp_path / "shards", 2, 2)
    cfg = EvalConfig.from_argv(["--shards", str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "shards"),
                                "--model", "tiny_cnn", "--methods", "gradcam", "--metrics", "ad"], "imagenet")
    rc = job_main(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a shard folder" in err[0]


def test_a_malicious_pickle_is_refused_with_the_whole_reason(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"features.0.weight": Evil()}, handle, protocol=2)  # torch.save's protocol
    with pytest.raises(WeightsError) as info:
        load("tiny_cnn", path)
    text = str(info.value)
    assert "is not a plain state dict and was not loaded" in text and "arbitrary code" in text
    ok = tmp_path / "ok.pth"
    torch.save(load("tiny_cnn").model.net.state_dict(), ok)
    assert load("tiny_cnn", ok).weights_sha256


def test_report_markdown_escapes_keys_and_errors():
    import pandas as pd

    from unioncam.service.report.render import _markdown

    md = _markdown(pd.DataFrame({"key": ["<script>alert(1)</script>", "a|b"], "error": ["x\ny", "<img onerror=z>"]}))
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    assert "a\\|b" in md and "x y" in md and md.count("\n") == 3  # header, rule, two rows: no row broken


def test_a_pool_the_cluster_cannot_hold_is_shrunk_or_refused():
    from unioncam.service.runner import plan_resources

    cfg = EvalConfig(shards="x/*.tar", out="o", workers=3, cpus_per_worker=1).resolved()
    assert plan_resources(cfg, 4, {"CPU": 2.0}) == (2, 0.0, 1.0)  # 3 asked, 2 fit
    gpu = EvalConfig(shards="x/*.tar", out="o", gpus_per_worker=1).resolved()
    with pytest.raises(ConfigError, match=r"asks for 1 GPU .* the cluster has 0 GPU"):
        plan_resources(gpu, 3, {"CPU": 2.0})
    assert plan_resources(EvalConfig(shards="x/*.tar", out="o").resolved(), 8, {"CPU": 16.0, "GPU": 4.0}) == \
        (4, 1.0, 4.0)  # one worker per GPU
    # An autoscaling cluster (no GPU node yet, up to 8 GPUs): GPU workers are planned against what it
    # can grow to and waited for (start_timeout), not refused; beyond the ceiling they are shrunk.
    ceiling = {"CPU": 66.0, "GPU": 8.0}
    assert plan_resources(gpu, 3, {"CPU": 2.0}, ceiling) == (1, 1.0, 2.0)
    many = EvalConfig(shards="x/*.tar", out="o", workers=12, gpus_per_worker=1, cpus_per_worker=4).resolved()
    assert plan_resources(many, 20, {"CPU": 2.0}, ceiling) == (8, 1.0, 4.0)
    with pytest.raises(ConfigError, match=r"the cluster can grow to 8 GPU and 66 CPU"):
        plan_resources(replace(many, cpus_per_worker=80.0), 20, {"CPU": 2.0}, ceiling)


def test_nan_weights_give_error_rows_not_zero_maps(tmp_path):
    from service_data import make_shards

    from unioncam.service import read_metrics
    from unioncam.service.worker import ShardEvaluator

    make_shards(tmp_path / "shards", 2, 2)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam", "scorecam"], metrics=["ad", "ai", "epg"]).resolved()
    ev = ShardEvaluator(cfg)
    with torch.no_grad():
        ev.model.net.features[3].weight[0, 0, 0, 0] = float("nan")
    ev.evaluate(str(tmp_path / "shards" / "t-000000.tar"), cfg.out)
    rows = read_metrics(cfg.out).to_pandas()
    assert len(rows) == 4 and rows["error"].notna().all()
    assert rows["error"].str.contains("non-finite").all() and rows["y"].isna().all()


def test_cli_refuses_inputs_that_would_overwrite_each_other(tmp_path, capsys):
    from unioncam.cli import main
    from unioncam.data.sample import sample_photo_paths

    photo = sample_photo_paths(["chelsea"])["chelsea"]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "cat.png").write_bytes(photo.read_bytes())
    assert main(["explain", str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png"), "--model", "tiny_cnn",
                 "--out", str(tmp_path / "o")]) == 2
    assert "would write the same" in capsys.readouterr().err


def test_report_refuses_a_negative_overlay_count(tmp_path, capsys):
    from unioncam.cli import main as cli

    assert cli(["report", str(tmp_path), "--overlays", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "unioncam: error: --overlays must be >= 0, got -1"
