"""The hardening issue's refactors: one helper per repeated idiom (bit-identical to the code it
replaces), dead code gone, the one evaluation entry, and the converters' error handling."""

from __future__ import annotations

import importlib.util
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from PIL import Image

import unioncam
import unioncam.evaluation as metrics
from unioncam.data.annotations import XMLObject, parse_xml_objects, read_xml_objects
from unioncam.data.imagenet import imagenet_samples, read_box_xml
from unioncam.data.shards import MANIFEST, iter_samples, write_shards
from unioncam.data.voc import read_voc_xml, voc_samples
from unioncam.engine import predict
from unioncam.methods.gradient import gradcampp_alpha, xgradcam_weights
from unioncam.methods.integrative import IntegrativeCAM, generalized_alpha
from unioncam.methods.union import pixel_average_alpha
from unioncam.ops import normalize, safe_divide

REPO = Path(__file__).resolve().parents[1]
KIT_FOX = "n02119789"  # torchvision 278


def jpeg(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def random_pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and gradients ``3×5×7×7`` with an all-zero channel, an all-zero gradient and a
    channel whose activations sum to 0 (XGrad-CAM's and α's zero denominators)."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.rand(3, 5, 7, 7, generator=gen, dtype=dtype)
    grads = torch.randn(3, 5, 7, 7, generator=gen, dtype=dtype)
    acts[0, 1] = 0
    grads[1, 2] = 0
    acts[2, 3] = torch.randn(7, 7, generator=gen, dtype=dtype)
    acts[2, 3] -= acts[2, 3].mean()
    acts[2, 3, 0, 0] -= acts[2, 3].sum()
    return acts, grads


# -- safe_divide --------------------------------------------------------------------------------
def test_safe_divide_hand_values_and_zeros():
    num = torch.tensor([6.0, 1.0, 0.0, -3.0, 5.0])
    den = torch.tensor([3.0, 0.0, 0.0, 2.0, -0.0])
    assert safe_divide(num, den).tolist() == [2.0, 0.0, 0.0, -1.5, 0.0]
    where = torch.tensor([True, False, False, False, False])  # only the first is divided
    assert safe_divide(num, den, where).tolist() == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert safe_divide(1.0, torch.tensor([4.0, 0.0])).tolist() == [0.25, 0.0]
    col = safe_divide(torch.ones(2, 3), torch.tensor([[2.0], [0.0]]))  # broadcasts
    assert col.tolist() == [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]


def test_safe_divide_gradients_are_finite_where_the_naive_idiom_gives_nan():
    num = torch.tensor([6.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    den = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    safe_divide(num, den).sum().backward()
    assert torch.isfinite(num.grad).all() and torch.isfinite(den.grad).all()
    assert num.grad.tolist() == [1 / 3, 0.0, 0.0] and den.grad.tolist() == [-6 / 3 / 3, 0.0, 0.0]
    num.grad = den.grad = None
    torch.where(den != 0, num / den, torch.zeros_like(num)).sum().backward()  # what the helper avoids
    assert torch.isnan(den.grad).any()
    flat = torch.full((1, 4, 4), 0.3, requires_grad=True)  # a constant map through normalize
    normalize(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_helpers_are_bit_identical_to_the_idioms_they_replace(dtype):
    acts, grads = random_pair(dtype)
    maps = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(3), dtype=dtype)
    maps[1] = 2.0
    lo, hi = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    old_norm = torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                           torch.zeros_like(maps))
    assert torch.equal(normalize(maps), old_norm)

    total = acts.sum(dim=(2, 3), keepdim=True)
    safe = torch.where(total != 0, total, torch.ones_like(total))
    old_x = torch.where(total[..., 0, 0] != 0, (acts / safe * grads).sum(dim=(2, 3)),
                        torch.zeros_like(total[..., 0, 0]))
    assert (total == 0).any()
    assert torch.equal(xgradcam_weights(acts, grads), old_x)

    denoised = torch.where(grads > 0.3, grads, torch.zeros_like(grads))
    denoised[0, 0] = -1.0  # a channel without any positive value
    positive = denoised > 0
    tot = (denoised * positive).sum(dim=(2, 3), keepdim=True)
    old_alpha = torch.where(positive, 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot)),
                            torch.zeros_like(denoised))
    assert torch.equal(pixel_average_alpha(denoised), old_alpha)

    energy = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(4), dtype=dtype)
    energy[1] = 0
    inside = energy[0, 1:5, 1:5].sum()
    epg = metrics.energy_pointing_game(energy, [[[1, 1, 5, 5]], [[0, 0, 3, 3]]])
    assert torch.equal(epg, torch.stack([inside / energy[0].sum(), torch.zeros((), dtype=dtype)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradcampp_alpha_is_the_generalized_alpha_with_unit_phi_factors(dtype):
    acts, grads = random_pair(dtype, seed=7)
    ones = torch.ones(3, dtype=dtype)
    alpha = gradcampp_alpha(acts, grads)
    assert torch.equal(alpha, generalized_alpha(acts, grads, ones, ones))
    g2 = grads.pow(2)  # the formula Grad-CAM++ used to spell out
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * grads.pow(3)
    old = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    assert torch.equal(alpha, old)
    assert (alpha[1, 2] == 0).all()  # a zero gradient: zero denominator, α = 0


# -- the predicted-class forward ----------------------------------------------------------------
def test_predict_gives_the_argmax_as_ordinary_targets():
    model, x = ref.hand_model(), ref.hand_images(3)
    classes, logits = predict(model, x)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(logits, expected) and torch.equal(classes, expected.argmax(dim=1))
    assert not classes.is_inference()  # usable as targets by the methods' backward
    explained = unioncam.explain(model, x, "gradcam", targets=classes)
    assert torch.equal(explained.maps, unioncam.explain(model, x, "gradcam").maps)


# -- dead and misleading code ------------------------------------------------------------------
def test_integrativecam_compute_is_not_a_second_entry():
    model, x = ref.hand_model(), ref.hand_images(2)
    with IntegrativeCAM(model) as cam:
        cam(x)  # the real pipeline: compute_layers
        with pytest.raises(NotImplementedError, match="compute_layers"):
            cam.compute(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, 6, 6), None, torch.zeros(2, 3))


def test_region_map_is_scorecams_output_already_normalized():
    model, x = ref.hand_model(), ref.hand_images(3)
    union = unioncam.explain(model, x, "unioncam", batch_size=3)
    score = unioncam.explain(model, x, "scorecam", batch_size=3)
    region = union.details["region_map"]
    assert region.shape == x.shape[:1] + x.shape[2:]
    assert torch.equal(normalize(region), region)
    assert torch.equal(region, score.maps)


# -- annotation XML ------------------------------------------------------------------------------
XML = """<annotation><filename>x.jpg</filename>
  <object><name> dog </name><difficult>1</difficult><truncated>0</truncated>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>8</ymax></bndbox></object>
  <object><name>person</name><truncated>1</truncated>
    <bndbox><xmin>11</xmin><ymin>21.5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
  <object><name>cat</name></object>
</annotation>"""


def test_one_xml_parser_for_voc_and_imagenet(tmp_path):
    objects = parse_xml_objects(XML)
    assert objects == [XMLObject("dog", (1.0, 2.0, 10.0, 8.0), difficult=True, truncated=False),
                       XMLObject("person", (11.0, 21.5, 50.0, 40.0), difficult=False, truncated=True),
                       XMLObject("cat", None, difficult=False, truncated=False)]
    path = tmp_path / "a.xml"
    path.write_text(XML)
    assert read_xml_objects(path) == objects
    # ImageNet: inclusive indices → [xmin, ymin, xmax + 1, ymax + 1]; an object without a box is skipped
    assert read_box_xml(path) == [("dog", [1.0, 2.0, 11.0, 9.0]), ("person", [11.0, 21.5, 51.0, 41.0])]
    # VOC: 1-based inclusive → [xmin − 1, ymin − 1, xmax, ymax]; an object without a box is an error
    with pytest.raises(ValueError, match="bad object 'cat'"):
        read_voc_xml(path)
    path.write_text(XML.replace("<object><name>cat</name></object>", ""))
    dog, person = read_voc_xml(path)
    assert dog == {"name": "dog", "label": 11, "bbox": [0.0, 1.0, 10.0, 8.0], "difficult": True, "truncated": False}
    assert person["bbox"] == [10.0, 20.5, 50.0, 40.0] and person["truncated"] and not person["difficult"]
    missing = parse_xml_objects("<a><object><name>x</name><bndbox><xmin>3</xmin></bndbox></object></a>")[0]
    assert missing.box is not None and missing.box[0] == 3.0 and all(np.isnan(missing.box[1:]))


# -- the one evaluation entry ---------------------------------------------------------------------
@pytest.fixture
def eval_entry(monkeypatch, fake_runner):
    """``jobs/eval.py`` as a module, with ``unioncam.service.runner`` replaced by a recorder (no Ray)."""
    spec = importlib.util.spec_from_file_location("eval", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "eval", module)  # what the wrappers import
    return module, fake_runner


def test_eval_entry_takes_the_dataset(eval_entry):
    entry, calls = eval_entry
    assert entry.main(["--limit", "3", "--dataset", "voc", "--methods", "gradcam"]) == 0
    assert entry.main(["--dataset=imagenet"]) == 0
    assert [(c.dataset, c.limit, c.shards) for c in calls] == [
        ("voc", 3, "datasets/sample/voc/sample-voc-*.tar"),
        ("imagenet", None, "datasets/sample/imagenet/sample-imagenet-*.tar")]
    assert calls[0].methods == ["gradcam"]


@pytest.mark.parametrize("argv", [[], ["--limit", "2"], ["--dataset", "cifar"], ["--data", "voc"]])
def test_eval_entry_refuses_a_missing_or_unknown_dataset(eval_entry, argv, capsys):
    entry, calls = eval_entry
    assert entry.main(argv) == 2
    assert "--dataset" in capsys.readouterr().err and calls == []


def test_eval_entry_help_without_a_dataset(eval_entry, capsys):
    entry, _ = eval_entry
    assert entry.main(["--help"]) == 0 and "--dataset" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["imagenet", "voc"])
def test_the_two_documented_commands_are_the_entry_with_the_dataset_fixed(eval_entry, dataset, monkeypatch):
    _, calls = eval_entry
    monkeypatch.setattr(sys, "argv", [f"jobs/eval_{dataset}.py", "--limit", "5"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "jobs" / f"eval_{dataset}.py"), run_name="__main__")
    assert exc.value.code == 0 and [(c.dataset, c.limit) for c in calls] == [(dataset, 5)]


# -- converters ----------------------------------------------------------------------------------
def test_a_missing_or_unreadable_voc_image_is_an_error_record_not_an_abort(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Main/test.txt").write_text("000001\n000002\n000003\n000004\n")
    box = ("<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
           "<ymax>8</ymax></bndbox></object></annotation>")
    for i in (1, 2, 3, 4):
        (root / f"Annotations/00000{i}.xml").write_text(box)
    (root / "JPEGImages/000001.jpg").write_bytes(jpeg(1))
    (root / "JPEGImages/000003.jpg").mkdir()  # listed, present, but not a readable file
    (root / "JPEGImages/000004.jpg").write_bytes(jpeg(4))  # 000002.jpg does not exist
    samples, info = voc_samples(root)
    out = tmp_path / "shards"
    manifest = write_shards(samples, out, "voc", 2, info)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "voc-000000.tar", "voc-000001.tar"]  # no .tmp
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest and manifest["count"] == 4 and manifest["labelled"] == 2
    assert manifest["image_errors"] == ["000002", "000003"]
    records = {r["key"]: r for r in iter_samples(str(out / "*.tar"))}
    assert sorted(records) == ["000001", "000002", "000003", "000004"]
    assert "error" not in records["000001"] and "error" not in records["000004"]
    assert records["000001"]["label"] == records["000004"]["label"] == 11
    assert "000002.jpg" in records["000002"]["error"] and "000003.jpg" in records["000003"]["error"]
    with __import__("tarfile").open(out / "voc-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000002.json").read())
    assert meta == {"file": "000002.jpg", "error": "split lists 000002 but 000002.jpg does not exist"}


def test_imagenet_folder_layout_takes_only_image_files(tmp_path):
    folder = tmp_path / "val" / KIT_FOX
    folder.mkdir(parents=True)
    (folder / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(1))
    (folder / "b.png").write_bytes(jpeg(2))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()
    (tmp_path / "val" / ".DS_Store").write_bytes(b"\x00")
    samples, info = imagenet_samples(tmp_path / "val")
    got = [(s.key, s.ext, s.label) for s in samples]
    assert got == [("ILSVRC2012_val_00000001", "jpg", 278), ("b", "png", 278)]
    assert info["unlabelled"] == []
