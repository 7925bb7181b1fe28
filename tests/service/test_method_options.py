"""The methods' own options in the job and the CLI (``--method-option METHOD.OPTION=VALUE``, YAML
``method_options``): parsed and checked before anything runs, recorded in the manifest's settings and the
files' provenance, and given to the method in the worker, whose maps are then ``explain``'s with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_data import make_shards

from unioncam import explain, load
from unioncam.cli import main as cli
from unioncam.data.shards import iter_samples
from unioncam.engine import predict
from unioncam.service import ConfigError, EvalConfig
from unioncam.service.config import parse_method_options
from unioncam.service.results import map_array, provenance_of, read_maps_file
from unioncam.service.runner import check_model
from unioncam.service.worker import ShardEvaluator


def test_flags_parse_into_checked_options_recorded_only_when_given() -> None:
    assert parse_method_options(["sscam.num_samples=3", "sscam.std=1.5", "kpcacam.kernel=rbf",
                                 "finercam.comparison_ranks=[1, 2]", "unioncam.skip_constant=false"]) == {
        "sscam": {"num_samples": 3, "std": 1.5}, "kpcacam": {"kernel": "rbf"},
        "finercam": {"comparison_ranks": [1, 2]}, "unioncam": {"skip_constant": False}}
    flags = ["--model", "tiny_cnn", "--methods", "gradcam,sscam,kpcacam", "--method-option", "KPCACAM.kernel=rbf",
             "--method-option", "sscam.std=1.5", "--method-option", "sscam.num_samples=3"]
    cfg = EvalConfig.from_argv(flags, "imagenet")
    assert cfg.method_options == {"sscam": {"num_samples": 3, "std": 1.5}, "kpcacam": {"kernel": "rbf"}}
    assert cfg.identity()["method_options"] == cfg.method_options  # a rerun with other options is refused
    assert "method_options" not in EvalConfig(model="tiny_cnn").resolved().identity()  # earlier runs: as before
    yaml_like = EvalConfig.from_dict({"methods": "sscam", "method_options": {"sscam": {"num_samples": 2}},
                                      "model": "tiny_cnn"}).resolved()
    assert yaml_like.method_options == {"sscam": {"num_samples": 2}}


@pytest.mark.parametrize(("flags", "message"), [
    (["--method-option", "sscam.num_samples"], r"expected METHOD\.OPTION=VALUE"),
    (["--method-option", "num_samples=3"], r"expected METHOD\.OPTION=VALUE"),
    (["--method-option", "scorecam.skip_constant=false"], r"for scorecam, which does not run here \(methods: "
                                                           r"gradcam, sscam\)"),
    (["--method-option", "sscam.samples=3"], r"sscam has no option 'samples'; its options: num_samples, std$"),
    (["--method-option", "sscam.batch_size=3"], r"the job sets it for every method; use --batch-size"),
    (["--method-option", "sscam.seed=3"], r"use --seed"),
    (["--method-option", "gradcan.x=1"], r"did you mean 'gradcam'"),
    (["--method-option", "gradcam.x=1"], r"gradcam has no option 'x'; its options: none"),
])
def test_bad_options_are_one_line_before_anything_runs(flags, message, capsys) -> None:
    argv = ["--model", "tiny_cnn", "--methods", "gradcam,sscam", *flags]
    with pytest.raises(ConfigError, match=message):
        EvalConfig.from_argv(argv, "imagenet")
    with pytest.raises(ConfigError, match="must map a method to a mapping"):
        EvalConfig.from_dict({"methods": "sscam", "method_options": {"sscam": 3}}).resolved()


def test_the_driver_checks_values_and_the_worker_uses_them(tmp_path: Path) -> None:
    shard = make_shards(tmp_path / "shards", n_images=2, shard_size=8)[0]
    base = {"shards": str(shard), "model": "tiny_cnn", "metrics": ["ad"], "methods": ["gradcam", "kpcacam"]}
    bad = EvalConfig(**base, out=str(tmp_path / "bad"), method_options={"kpcacam": {"kernel": "nope"}}).resolved()
    with pytest.raises(ConfigError, match=r"^--method-option kpcacam: kpcacam: unknown kernel 'nope'; valid: "):
        check_model(bad)
    cfg = EvalConfig(**base, out=str(tmp_path / "run"), method_options={"kpcacam": {"kernel": "rbf"}}).resolved()
    _, checked = check_model(cfg)
    assert checked.method_options == {"kpcacam": {"kernel": "rbf"}}
    ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shard), str(cfg.out))
    maps_file = Path(str(cfg.out)) / "maps" / f"{shard.stem}.parquet"
    assert provenance_of(str(Path(str(cfg.out)) / "metrics" / f"{shard.stem}.parquet"))["method_options"] == \
        {"kpcacam": {"kernel": "rbf"}}
    table, shape = read_maps_file(str(maps_file))
    stored = dict(zip(zip(table.column("key").to_pylist(), table.column("method").to_pylist(), strict=True),
                      map_array(table, shape), strict=True))
    model = load("tiny_cnn").model
    for s in iter_samples(str(shard), (64, 64)):
        x = s["image"][None]
        t = predict(model, x)[0]
        rbf = explain(model, x, "kpcacam", targets=t, kernel="rbf").maps[0].numpy()
        sigmoid = explain(model, x, "kpcacam", targets=t).maps[0].numpy()
        np.testing.assert_allclose(stored[(s["key"], "kpcacam")], rbf, atol=2e-3)  # float16 as stored
        assert np.abs(stored[(s["key"], "kpcacam")] - sigmoid).max() > 5e-3  # not the default kernel's map


def test_explain_takes_the_same_options(tmp_path: Path, capsys) -> None:
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "o"
    assert cli(["explain", str(photo), "--model", "tiny_cnn", "--method", "kpcacam", "--method-option",
                "kpcacam.kernel=rbf", "--out", str(out)]) == 0
    assert (out / "p_kpcacam.png").is_file()
    capsys.readouterr()
    assert cli(["explain", str(photo), "--model", "tiny_cnn", "--method", "kpcacam", "--method-option",
                "kpcacam.kernel=nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method-option kpcacam: kpcacam: unknown kernel 'nope'" in err[0]


def test_a_rescore_refuses_a_seed_or_options_of_its_own(tmp_path: Path) -> None:
    options = {"sscam": {"num_samples": 2}}
    for given, flag in (({"seed": 3}, "--seed"), ({"method_options": options}, "--method-option")):
        with pytest.raises(ConfigError, match=f"made with that run's seed and method options: give no {flag}$"):
            EvalConfig(rescore=str(tmp_path), **given).resolved()  # type: ignore[arg-type]


def test_two_spellings_of_a_method_merge_and_an_empty_mapping_is_no_option() -> None:
    from unioncam.service.config import check_method_options

    assert check_method_options({"SSCAM": {"num_samples": 5}, "sscam": {"std": 1.0}}, ["sscam"]) == \
        {"sscam": {"num_samples": 5, "std": 1.0}}
    empty = EvalConfig.from_dict({"methods": "sscam", "method_options": {"sscam": {}}, "model": "tiny_cnn"}).resolved()
    assert empty.method_options == {} and "method_options" not in empty.identity()
