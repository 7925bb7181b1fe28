"""The ``unioncam explain`` command: outputs, printed values and one-line errors with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unioncam.cli import main


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(gray16)
    return path, gray16


def test_explain_writes_overlays_and_prints_ams(photo, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["explain", str(photo[0]), str(photo[1]), "--model", "tiny_cnn", "--method", "all", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    # "all" leaves out what cannot explain this CNN (LeGrad reads attention), in one line each
    assert captured.err.splitlines() == [line for line in captured.err.splitlines() if line.startswith("leaving out")]
    assert any(line.startswith("leaving out legrad: model TinyCNN has no transformer block") for line in
               captured.err.splitlines())
    assert not (out / "photo_legrad.png").exists() and (out / "photo_groupcam.png").exists()
    for stem in ("photo", "gray16"):
        for method in ("gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "unioncam"):
            with Image.open(out / f"{stem}_{method}.png") as img:
                assert img.size == (64, 64) and img.mode == "RGB"
    assert lines[0].startswith("photo.jpg: class_")
    union = [line for line in lines if line.strip().startswith("unioncam")]
    assert len(union) == 2 and all("AMS=" in u and "β_reg=" in u for u in union)


@pytest.mark.parametrize(("args", "message"), [
    (["missing.png"], "no such image"),
    (["{photo}", "--method", "gradcan"], "did you mean 'gradcam'"),
    (["{bad}"], "cannot decode image"),
    (["{photo}", "--model", "resnet"], "unknown model"),
    (["{photo}", "--model", "tiny_cnn", "--weights", "{bad}"], "corrupt or not a state dict"),
    (["{photo}", "--target", "99999"], "--target 99999 is not a class of tiny_cnn (0..9)"),
    (["{photo}", "--target", "-1"], "--target -1 is not a class"),
    (["{photo}", "--batch-size", "-3"], "--batch-size must be >= 1"),
    (["{photo}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{photo}", "--steps", "0"], "--steps must be >= 1"),
    (["{photo}", "--method", "gradcam,legrad"],
     "legrad: model TinyCNN has no transformer block with self-attention at its target layer features.4"),
    pytest.param(["{photo}", "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_usage_errors_are_one_line_exit_2(photo, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = ["explain"] + [a.format(photo=photo[0], bad=bad) for a in args] + ["--out", str(tmp_path / "o")]
    if "--model" not in argv:
        argv += ["--model", "tiny_cnn"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_explain_metrics_prints_values(photo, tmp_path, capsys):
    rc = main(["explain", str(photo[0]), "--model", "tiny_cnn", "--method", "gradcam", "--metrics",
               "--steps", "8", "--out", str(tmp_path / "o")])
    assert rc == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if "Y=" in li)
    values = dict(item.split("=") for item in line.split())
    y, o = float(values["Y"]), float(values["O"])
    assert 0 < y <= 1 and 0 <= o <= 1
    assert float(values["drop"].rstrip("%")) == pytest.approx(max(0.0, y - o) / y * 100, abs=0.02)
    assert values["increase"] == ("100%" if y < o else "0%")
    assert 0 <= float(values["insertion"]) <= 1 and 0 <= float(values["deletion"]) <= 1
