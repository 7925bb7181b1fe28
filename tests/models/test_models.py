"""Model loading (local file, hub cache, clear errors) and the real EfficientNet-Lite0 on real photos."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torchvision.models import vgg16

import unioncam
from unioncam.models import VGG16_FILE, WeightsError, load
from unioncam.storage import sha256 as sha256_file
from unioncam.viz import load_image


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A random VGG16 state dict written by the test (real architecture, not real weights)."""
    torch.manual_seed(0)
    net = vgg16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_vgg16_from_file_and_inplace_relu_gradients(vgg_weights):
    path, original = vgg_weights
    loaded = load("vgg16", path)
    assert loaded.target_layer == "features.29" and loaded.input_size == (224, 224)
    assert loaded.weights_sha256 == sha256_file(path)
    assert len(loaded.class_names) == 1000 and loaded.class_names[281] == "tabby"
    assert all(not p.requires_grad for p in loaded.model.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = unioncam.explain(loaded, x, "gradcam")
    # Hook-free reference: split VGG16 at features.29 by hand and differentiate the top part.
    original.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        acts = original.features[:30]((x - mean) / std)
    acts.requires_grad_(True)
    logits = original.classifier(torch.flatten(original.avgpool(original.features[30](acts)), 1))
    targets = logits.argmax(1)
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    assert result.targets.tolist() == targets.tolist()
    torch.testing.assert_close(result.maps, (cam - lo) / (hi - lo), atol=1e-5, rtol=0)
    assert all(p.grad is None for p in original.parameters())


def test_vgg16_from_hub_cache(vgg_weights, tmp_path, monkeypatch):
    path, _ = vgg_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"--weights PATH.*hub cache") as err:
        load("vgg16")
    assert str(tmp_path) in str(err.value)
    cached = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    cached.parent.mkdir(parents=True)
    os.symlink(path, cached)
    assert load("vgg16").weights_sha256 == sha256_file(path)


def test_bad_weights_files_get_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load("tiny_cnn", tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(WeightsError, match="corrupt or not a state dict"):
        load("tiny_cnn", corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save(load("tiny_cnn").model.net.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(WeightsError, match="corrupt or not a state dict"):
        load("tiny_cnn", truncated)
    mismatched = tmp_path / "mismatched.pth"
    torch.save({"conv.weight": torch.zeros(3)}, mismatched)
    with pytest.raises(WeightsError, match="does not match the architecture"):
        load("tiny_cnn", mismatched)
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as handle:
        pickle.dump({"x": Path("/")}, handle)  # not loadable with weights_only=True
    with pytest.raises(WeightsError, match="corrupt or not a state dict"):
        load("tiny_cnn", unsafe)


def test_wrong_architecture_weights_are_counted_not_listed(vgg_weights, tmp_path):
    path, net = vgg_weights
    with pytest.raises(WeightsError) as caught:
        load("tiny_cnn", path)  # VGG16's 32 tensors for tiny_cnn's
    text = str(caught.value)
    tiny = load("tiny_cnn").model.net.state_dict()
    missing = sum(k not in net.state_dict() for k in tiny)
    unexpected = sum(k not in tiny for k in net.state_dict())
    assert f"{missing} keys missing (" in text and f"{unexpected} unexpected keys (" in text
    assert len(text) < 600 and "\n" not in text and text.count("features.") <= 9  # at most 3 shown of each kind
    shaped = {k: torch.zeros(2, *v.shape[1:]) if v.dim() else v for k, v in tiny.items()}
    torch.save(shaped, tmp_path / "shaped.pth")
    n_shaped = sum(v.dim() > 0 and v.shape[0] != 2 for v in tiny.values())
    with pytest.raises(WeightsError, match=rf"{n_shaped} mis-shaped tensors \(features\.0\.weight \(2, 3, 3, 3\) "
                                           r"for \(8, 3, 3, 3\)"):
        load("tiny_cnn", tmp_path / "shaped.pth")


def test_non_finite_weights_are_refused_in_one_line(tmp_path, capsys):
    from unioncam.cli import main as cli

    state = load("tiny_cnn").model.net.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=rf"nan\.pth holds non-finite values \(NaN or inf\) in 1 tensor\(s\), "
                                           rf"e\.g\. {name}"):
        load("tiny_cnn", path)
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    rc = cli(["explain", str(image), "--model", "tiny_cnn", "--weights", str(path), "--method", "gradcam",
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nan.pth holds non-finite values" in err[0], err


def test_explain_refuses_a_model_whose_output_is_not_finite(tmp_path, capsys):
    from PIL import Image

    from unioncam.cli import main as cli

    state = {k: v * 1e20 if v.is_floating_point() else v for k, v in load("tiny_cnn").model.net.state_dict().items()}
    path = tmp_path / "huge.pth"
    torch.save(state, path)  # finite weights whose activations overflow float32
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    rc = cli(["explain", str(image), "--model", "tiny_cnn", "--weights", str(path), "--method", "gradcam",
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "huge.pth: the model's output for photo.png is not finite (NaN/inf logits)" in err[0]


def test_tiny_weights_roundtrip(tmp_path):
    net = unioncam.models.TinyCNN()
    torch.nn.init.constant_(net.classifier.bias, 0.25)
    path = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), path)
    loaded = load("tiny_cnn", path)
    assert torch.equal(loaded.model.net.classifier.bias, torch.full((10,), 0.25))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"did you mean 'vgg16'.*valid: vgg16, efficientnet_lite0, tiny_cnn"):
        load("vgg61")


# --- the real EfficientNet-Lite0 on real photos ------------------------------------------------
skimage = pytest.importorskip("skimage")
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return load("efficientnet_lite0", channels_last=True)  # the service's default: its masked forwards are faster


def test_lite0_predicts_real_photos(lite0):
    names = ["chelsea.png", "coffee.png", "motorcycle_left.png"]
    x = torch.stack([load_image(SKIMAGE_DATA / n, lite0.input_size) for n in names])
    with torch.no_grad():
        pred = lite0.model(x).argmax(1).tolist()
    assert pred[0] in CAT_CLASSES
    assert lite0.class_names[pred[1]] in {"espresso", "cup", "coffee mug"}
    assert lite0.class_names[pred[2]] in {"moped", "motor scooter", "crash helmet", "disk brake"}


def test_lite0_maps_cover_the_object(lite0):
    """On chelsea the cat fills the centre; on coffee the cup. The maps must put more than their
    fair share of energy inside a hand-drawn box around the object (224×224 coordinates)."""
    boxes = {"chelsea.png": (40, 20, 200, 224), "coffee.png": (50, 0, 190, 160)}
    x = torch.stack([load_image(SKIMAGE_DATA / n, lite0.input_size) for n in boxes])
    for method in ("gradcam", "layercam", "unioncam"):
        maps = unioncam.explain(lite0, x, method, batch_size=16).maps
        for i, (x0, y0, x1, y1) in enumerate(boxes.values()):
            inside = maps[i, y0:y1, x0:x1].sum() / maps[i].sum()
            area = (x1 - x0) * (y1 - y0) / 224**2
            assert inside > area + 0.1, (method, i, float(inside), area)
