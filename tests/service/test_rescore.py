"""--protocol in the service and `unioncam rescore` without Ray: a run's saved maps scored again under
another protocol into a separate table, equal to :mod:`unioncam.evaluation` on the same maps, images and
targets; the run's own files untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from service_data import make_shards

from unioncam.data.shards import iter_samples
from unioncam.evaluation import average_drop, confidence, energy_pointing_game, insertion_deletion
from unioncam.models import load
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.report import load_rows, write_report
from unioncam.service.results import provenance_of, read_saliency
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator

METHODS = ["gradcam", "unioncam"]


def evaluated_run(tmp_path: Path, **kw: object) -> tuple[EvalConfig, list[Path]]:
    """A finished one-shard run of tiny_cnn with maps (and ROAD), and a manifest as the runner writes it."""
    shards = make_shards(tmp_path / "shards", n_images=5, shard_size=8, boxes=True, bad=True)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=METHODS, insdel_steps=8, metrics=["all"], **kw).resolved()  # type: ignore[arg-type]
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    counts = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id).evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    return cfg, shards


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "rescore" not in p.parts}


def test_protocol_option_in_the_config(tmp_path: Path) -> None:
    base = {"shards": "x-*.tar", "out": str(tmp_path / "o")}
    assert EvalConfig(**base).resolved().protocol == "reference"  # type: ignore[arg-type]
    assert EvalConfig(**base).resolved().insdel_steps == 224  # type: ignore[arg-type]
    torchcam = EvalConfig(**base, protocol="TorchCAM").resolved()  # type: ignore[arg-type]
    assert torchcam.protocol == "torchcam" and torchcam.insdel_steps == 20  # its recipe's 20 steps
    assert EvalConfig(**base, protocol="torchcam", insdel_steps=50).resolved().insdel_steps == 50  # type: ignore[arg-type]
    grad = EvalConfig(**base, protocol="pytorch_grad_cam").resolved()  # type: ignore[arg-type]
    assert grad.protocol == "pytorch-grad-cam" and grad.metrics == ["ad", "ai", "epg"]  # no curves in grad-cam
    with pytest.raises(ConfigError, match="defines no insertion/deletion"):
        EvalConfig(**base, protocol="pytorch-grad-cam", metrics=["insdel"]).resolved()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown protocol 'risee' \(did you mean 'rise'\?\)"):
        EvalConfig(**base, protocol="risee").resolved()  # type: ignore[arg-type]
    assert "protocol" in EvalConfig(**base).resolved().identity()  # type: ignore[arg-type]
    assert EvalConfig.from_argv(["--shards", "x", "--out", "o", "--protocol", "rise"], "imagenet").protocol == "rise"
    assert EvalConfig().resolved().insdel_steps == 32  # the sample's coarse curves, reference protocol
    assert EvalConfig(protocol="rise").resolved().insdel_steps == 224  # another protocol keeps its recipe


@pytest.mark.parametrize("protocol", ["rise", "pytorch-grad-cam", "torchcam"])
def test_rescore_equals_the_metrics_on_the_saved_maps_and_leaves_the_run_untouched(tmp_path: Path,
                                                                                   protocol: str) -> None:
    src, shards = evaluated_run(tmp_path)
    run = Path(str(src.out))
    before = files_digest(run)
    cfg = EvalConfig(rescore=str(run), protocol=protocol).resolved()
    assert cfg.out == str(run / "rescore" / protocol) and cfg.model == "tiny_cnn" and cfg.methods == METHODS
    assert not cfg.save_maps and cfg.shards is None
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    ev = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id)
    counts = ev.evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    assert files_digest(run) == before  # the original rows and maps are only read

    old = read_metrics(run).to_pandas().set_index(["key", "method"]).sort_index()
    new = read_metrics(cfg.out).to_pandas().set_index(["key", "method"]).sort_index()
    assert list(new.index) == list(old.index)  # the same rows, one each
    copied = ["shard", "target", "target_name", "rank", "label", "label_name", "beta_den", "beta_reg", "beta_dereg",
              "selected", "seconds", "error", "road_morf", "road_lerf"]  # ROAD is no protocol's: kept, not redone
    pd.testing.assert_frame_equal(new[copied], old[copied])
    assert old["road_morf"].notna().sum() == 2 * 5
    prov = provenance_of(str(Path(str(cfg.out)) / "metrics" / f"{shards[0].stem}.parquet"))
    assert prov["protocol"] == protocol and prov["rescore_of"] == str(run)

    # the same numbers from unioncam.evaluation on the saved maps, the decoded images and the rows' targets
    model = load("tiny_cnn").model
    samples = {s["key"]: s for s in iter_samples(str(shards[0]), (64, 64)) if "image" in s}
    good = new[new["error"].isna()]
    assert len(good) == 2 * 5
    for method in METHODS:
        keys, _, maps = read_saliency(run, method=method)
        x = torch.stack([samples[k]["image"] for k in keys])
        t = torch.tensor([int(old.loc[(k, method), "target"]) for k in keys])
        m = torch.from_numpy(maps)
        y, o = confidence(model, x, m, t, protocol=protocol)
        rows = good.loc[[(k, method) for k in keys]]
        np.testing.assert_allclose(rows["y"], y.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(rows["o"], o.numpy(), atol=1e-6, rtol=0)
        if protocol == "pytorch-grad-cam":
            assert rows["insertion_auc"].isna().all()  # grad-cam has no curves: not computed
        else:
            ins, dele = insertion_deletion(model, x, m, t, cfg.insdel_steps, protocol=protocol)
            np.testing.assert_allclose(rows["insertion_auc"], ins.numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(rows["deletion_auc"], dele.numpy(), atol=1e-6, rtol=0)
        boxed = [j for j, k in enumerate(keys) if samples[k]["boxes"]]
        epg = energy_pointing_game(m[boxed], [samples[keys[j]]["boxes"] for j in boxed])
        np.testing.assert_allclose(rows["epg"].to_numpy()[boxed], epg.numpy(), atol=1e-6, rtol=0)

    # the rescored run's report uses the protocol's drop and says which protocol it is
    df = load_rows(cfg.out)
    ok = df[df["error"].isna()]
    expect = average_drop(torch.tensor(ok["y"].to_numpy()), torch.tensor(ok["o"].to_numpy()), protocol)
    np.testing.assert_allclose(ok["drop"], expect.numpy(), atol=1e-9)
    write_report(cfg.out, overlays=0)
    text = (Path(str(cfg.out)) / "report" / "report.md").read_text()
    assert f"## Metric protocol: {protocol}" in text and f"rescored from {run}" in text
    if protocol == "pytorch-grad-cam":
        assert "100/N Σ max(0, Y−O) (absolute)" in text


def test_rescore_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    src, shards = evaluated_run(tmp_path / "a", save_maps=False)
    with pytest.raises(ConfigError, match="saved no maps"):
        EvalConfig(rescore=str(src.out), protocol="rise").resolved()
    with pytest.raises(ConfigError, match=r"cannot rescore .*manifest\.json"):
        EvalConfig(rescore=str(tmp_path / "nowhere"), protocol="rise").resolved()
    with pytest.raises(ConfigError, match="give no --shards"):
        EvalConfig(rescore=str(src.out), shards="x.tar").resolved()

    src, shards = evaluated_run(tmp_path / "b")
    for inside in ("", "metrics", "maps/x"):  # never into the rescored run's own files
        with pytest.raises(ConfigError, match=r"inside.*the rescored run's own files"):
            EvalConfig(rescore=str(src.out), protocol="rise", out=str(Path(str(src.out)) / inside)).resolved()
    cfg = EvalConfig(rescore=str(src.out), protocol="rise").resolved()
    RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None}).save()
    with pytest.raises(ConfigError, match="itself a rescore"):
        EvalConfig(rescore=str(cfg.out), protocol="torchcam").resolved()
    # weights other than the run's: its maps would not be this model's (checked before any worker starts)
    from unioncam.service import runner

    weights = tmp_path / "w.pt"
    torch.save(load("tiny_cnn").model.net.state_dict(), weights)
    with pytest.raises(ConfigError, match="computed with weights sha256 None"):
        runner.run(EvalConfig(rescore=str(src.out), protocol="rise", weights=str(weights),
                              out=str(tmp_path / "other")).resolved())
    # the shard's bytes changed since the run: the shard fails, nothing is written
    data = shards[0].read_bytes()
    shards[0].write_bytes(data + b"\0" * 1024)
    with pytest.raises(ValueError, match=r"changed since .* read it"):
        ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shards[0]), str(cfg.out))
    assert not (Path(str(cfg.out)) / "metrics").exists()


def test_cli_rescore_passes_the_run_and_protocol_to_the_job(tmp_path: Path, fake_runner, capsys) -> None:
    from unioncam.cli import main

    src, _ = evaluated_run(tmp_path)
    assert main(["rescore", str(src.out), "--protocol", "torchcam", "--workers", "1"]) == 0
    [cfg] = fake_runner  # the resolved config: the run's dataset, model and methods, this command's protocol
    assert (cfg.rescore, cfg.workers, cfg.protocol, cfg.dataset, cfg.model, cfg.methods, cfg.out) == (
        str(src.out), 1, "torchcam", src.dataset, src.model, src.methods,
        str(Path(str(src.out)) / "rescore" / "torchcam"))
    assert main(["rescore", str(tmp_path / "none"), "--protocol", "rise"]) == 2  # checked before Ray
    assert main(["rescore", str(src.out), "--protocol", "ryse"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(fake_runner) == 1 and len(err) == 2
    assert "cannot rescore" in err[0] and "unknown protocol 'ryse' (did you mean 'rise'?)" in err[1]


def test_cli_explain_metrics_under_a_protocol(tmp_path: Path, capsys) -> None:
    from unioncam.cli import main
    from unioncam.data.sample import sample_photo_paths

    photo = str(sample_photo_paths(["chelsea"])["chelsea"])
    out = str(tmp_path / "o")
    assert main(["explain", photo, "--model", "tiny_cnn", "--method", "gradcam", "--metrics", "--protocol",
                 "pytorch-grad-cam", "--out", out]) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if "Y=" in li)
    values = dict(item.split("=") for item in line.split())
    y, o = float(values["Y"]), float(values["O"])
    assert float(values["drop"].rstrip("%")) == pytest.approx(max(0.0, y - o) * 100, abs=0.02)  # absolute drop
    assert "insertion" not in values  # grad-cam defines no curves
    assert main(["explain", photo, "--model", "tiny_cnn", "--method", "gradcam", "--metrics", "--protocol",
                 "rise", "--steps", "4", "--out", out]) == 0
    assert "insertion=" in capsys.readouterr().out


def test_rescore_copies_a_shard_of_error_rows_only(tmp_path: Path) -> None:
    """A shard whose samples all failed has rows but no maps: the rescore copies its rows."""
    shards = make_shards(tmp_path / "shards", n_images=1, shard_size=1, bad=True)[1:2]  # "corrupt" alone
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=METHODS, insdel_steps=4).resolved()
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    counts = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id).evaluate(str(shards[0]), str(cfg.out))
    manifest.record(shards[0].stem, status="done", path=str(shards[0]), **counts)
    assert counts["maps"] == 0 and counts["rows"] == 2
    again = EvalConfig(rescore=str(cfg.out), protocol="torchcam").resolved()
    ShardEvaluator(again, "cpu", run_id="r2").evaluate(str(shards[0]), str(again.out))
    old, new = read_metrics(cfg.out).to_pandas(), read_metrics(again.out).to_pandas()
    pd.testing.assert_frame_equal(new[["key", "method", "error"]], old[["key", "method", "error"]])
    from unioncam.service.runner import _rescored_shards

    assert _rescored_shards(str(cfg.out)) == [str(shards[0])]
