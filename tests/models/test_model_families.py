"""Any classifier: torchvision and timm families by name, any nn.Module, weight-file variants.

Every family of README's "Models" table is built with seeded random weights written to a file by
the test, loaded by name, and explained at its default layer: unioncam's Grad-CAM must equal
pytorch-grad-cam's ``GradCAM`` on the same layer (Pearson ≥ 0.999, an independent implementation),
and UnionCAM must run. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import unioncam
from unioncam.models import WeightsError, load

tvm = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

TORCHVISION = [  # (name, the README table's default layer)
    ("resnet18", "layer4"),
    ("resnext50_32x4d", "layer4"),
    ("densenet121", "features.relu5"),
    ("mobilenet_v2", "features.18"),
    ("mobilenet_v3_small", "features.12"),
    ("efficientnet_b0", "features.8"),
    ("convnext_tiny", "features.7"),
    ("regnet_y_400mf", "trunk_output"),
    ("vgg11", "features.19"),
    ("inception_v3", "Mixed_7c"),
]
TIMM = [("resnet18", "layer4"), ("convnext_atto", "stages.3"), ("efficientnet_b0", "blocks.6"),
        ("regnetx_002", "s4"), ("vit_tiny_patch16_224", "blocks.11.norm1"),
        ("deit_tiny_distilled_patch16_224", "blocks.11.norm1")]


def random_weights(tmp_path, net: nn.Module, name: str = "w.pth") -> str:
    path = tmp_path / name
    torch.save(net.state_dict(), path)
    return str(path)


def photo(size: tuple[int, int]) -> torch.Tensor:
    from unioncam.data.sample import sample_photo_paths
    from unioncam.viz import load_image

    return load_image(sample_photo_paths()["chelsea"], size)[None]


def their_gradcam(loaded: unioncam.LoadedModel, x: torch.Tensor, target: int) -> np.ndarray:
    """pytorch-grad-cam 1.5.7's GradCAM on the same model, layer and reshape."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = loaded.model.net.get_submodule(loaded.target_layer)
    reshape = loaded.model.reshape_transform
    with GradCAM(model=loaded.model, target_layers=[layer], reshape_transform=reshape) as cam:
        # our model's parameters are frozen: an input that requires grad gives pytorch-grad-cam its graph
        return cam(input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(target)])[0]


@contextlib.contextmanager
def model_log() -> Iterator[list[logging.LogRecord]]:
    """The INFO records of ``unioncam.models`` logged inside the block (pytest's caplog needs the
    logging plugin, which some runs turn off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("unioncam.models")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def ours_and_theirs(loaded: unioncam.LoadedModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both Grad-CAMs for the most probable class whose map is not all zero (with random weights the
    ReLU of the weighted sum can vanish for a class, which makes a correlation undefined)."""
    with torch.no_grad():
        ranked = loaded.model(x)[0].topk(5).indices.tolist()
    for target in ranked:
        ours = unioncam.explain(loaded, x, "gradcam", targets=[target]).maps[0].numpy()
        if ours.max() > 0:
            return ours, their_gradcam(loaded, x, target)
    raise AssertionError("every top-5 class has an all-zero Grad-CAM map")


@pytest.mark.parametrize(("name", "layer"), TORCHVISION)
def test_torchvision_family_default_layer_and_gradcam_equals_pytorch_grad_cam(tmp_path, name, layer):
    torch.manual_seed(0)
    options = {"aux_logits": True, "transform_input": True, "init_weights": False} if name == "inception_v3" else {}
    weights = random_weights(tmp_path, tvm.get_model(name, weights=None, **options))
    loaded = load(f"torchvision:{name}", weights)
    meta = tvm.get_model_weights(name).DEFAULT
    assert loaded.name == f"torchvision:{name}" and loaded.target_layer == layer
    assert loaded.class_names == tuple(meta.meta["categories"])
    assert loaded.input_size == (meta.transforms().crop_size[0],) * 2
    assert loaded.mean == tuple(meta.transforms().mean) and loaded.resize_size == meta.transforms().resize_size[0]
    ours, theirs = ours_and_theirs(loaded, photo(loaded.input_size))
    assert pearson(ours, theirs) >= 0.999


@pytest.mark.parametrize(("name", "layer"), TIMM)
def test_timm_family_default_layer_and_gradcam_equals_pytorch_grad_cam(tmp_path, name, layer):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False)
    loaded = load(f"timm:{name}", random_weights(tmp_path, net))
    assert loaded.target_layer == layer and loaded.mean == tuple(net.pretrained_cfg["mean"])
    ours, theirs = ours_and_theirs(loaded, photo(loaded.input_size))
    assert pearson(ours, theirs) >= 0.999


def test_torchvision_vit_default_layer_is_the_last_blocks_ln_1():
    """torchvision names a ViT's blocks ``encoder_layer_0`` ...: the default layer must resolve, and LeGrad finds
    its blocks from it."""
    from unioncam.methods.legrad import find_blocks
    from unioncam.models import PixelModel
    from unioncam.models.torchvision import default_layer

    net = tvm.vit_b_16(weights=None)
    layer, reshape = default_layer("vit_b_16", net, (224, 224))
    assert layer == "encoder.layers.encoder_layer_11.ln_1" and reshape is not None
    assert net.get_submodule(layer) is net.encoder.layers[11].ln_1
    model = PixelModel(net, (0.5,) * 3, (0.5,) * 3, layer)
    assert find_blocks(model, None, 2) == [net.encoder.layers[10], net.encoder.layers[11]]


CHEAP = {"sscam": {"num_samples": 2}, "iscam": {"num_samples": 2}, "smoothgradcampp": {"num_samples": 2}}
REFUSED = {  # (model, method): the one-line refusal check_model gives before anything runs
    ("torchvision:mobilenet_v3_small", "cam"): "has no global-average-pooling \\+ linear head",
    ("timm:vit_tiny_patch16_224", "cam"): "cam: model",
    ("timm:convnext_atto", "cam"): "cam: model ConvNeXt has no global-average-pooling \\+ linear head",
    ("timm:convnext_atto", "integrativecam"): "integrativecam: model .* has no ReLU directly after a convolution",
    ("timm:vit_tiny_patch16_224", "integrativecam"): "integrativecam: model .* has no ReLU directly after a conv",
    ("torchvision:resnet18", "legrad"): "legrad: model ResNet has no transformer block with self-attention",
    ("torchvision:mobilenet_v3_small", "legrad"): "legrad: model MobileNetV3 has no transformer block",
    ("timm:convnext_atto", "legrad"): "legrad: model ConvNeXt has no transformer block",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:convnext_atto",
                                  "timm:vit_tiny_patch16_224"])
def test_every_registered_method_runs_on_every_family_or_refuses_in_one_line(tmp_path, name):
    """Every method of the registry on a model of each family (random weights): a finite map in [0, 1]
    at the input's size, or, where the method cannot apply, check_model's one-line refusal."""
    family, _, arch = name.partition(":")
    torch.manual_seed(0)
    net = tvm.get_model(arch, weights=None) if family == "torchvision" else timm.create_model(arch, pretrained=False)
    loaded = load(name, random_weights(tmp_path, net), input_size=None if "vit" in arch else 96)
    x = photo(loaded.input_size)
    for method in unioncam.METHODS.names():
        cls = unioncam.get_method(method)
        if (name, method) in REFUSED:
            with pytest.raises(ValueError, match=REFUSED[(name, method)]) as refused:
                cls.check_model(loaded.model, loaded.target_layer, loaded.input_size)
            assert "\n" not in str(refused.value)
            continue
        cls.check_model(loaded.model, loaded.target_layer, loaded.input_size)
        result = unioncam.explain(loaded, x, method, batch_size=64, **CHEAP.get(method, {}))
        m = result.maps[0]
        assert m.shape == loaded.input_size and torch.isfinite(m).all(), method
        assert m.min() >= 0 and m.max() <= 1, method


class Plain(nn.Module):
    """A user's classifier: nothing unioncam knows about it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_any_module_with_defaults_found_by_a_dry_run():
    torch.manual_seed(0)
    net = Plain()
    net.train()
    with model_log() as records:
        loaded = load(net, input_size=32)
    assert loaded.target_layer == "body"  # the outermost of body.3 / body, which end together
    assert any("explaining layer body" in r.getMessage() for r in records)
    assert loaded.class_names == tuple(f"class_{i}" for i in range(5)) and loaded.input_size == (32, 32)
    assert loaded.model.net is net and net.training  # wrapped as it is, not frozen or switched
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1), torch.tensor(loaded.std).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.model.eval()(x), net((x - mean) / std))
    named = load(net, target_layer="body.1", mean=(0.5,) * 3, std=(0.25,) * 3, input_size=(32, 48),
                 class_names=list("abcde"))
    assert named.target_layer == "body.1" and named.class_names == tuple("abcde") and named.input_size == (32, 48)
    torch.testing.assert_close(named.model(x), net((x - 0.5) / 0.25))
    assert unioncam.explain(named, x, "gradcam").maps.shape == (2, 32, 32)


def test_checkpoint_variants_nested_prefixed_and_safetensors(tmp_path):
    """A training checkpoint ({"state_dict": ...} or {"model": ...}), DataParallel's module. prefix and
    a safetensors file all load into the same weights; everything else is refused clearly."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = tvm.get_model("resnet18", weights=None)
    state = net.state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    variants = {"plain.pth": state, "nested.pth": {"state_dict": state, "epoch": 3},
                "model.pth": {"model": prefixed, "optimizer": {}}}
    for file, content in variants.items():
        torch.save(content, tmp_path / file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "nosuffix").write_bytes((tmp_path / "w.safetensors").read_bytes())  # found by its header
    x = torch.rand(1, 3, 64, 64)
    expected = load("torchvision:resnet18", tmp_path / "plain.pth", input_size=64).model(x)
    for file in ("nested.pth", "model.pth", "w.safetensors", "nosuffix"):
        got = load("torchvision:resnet18", tmp_path / file, input_size=64).model(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="cannot read safetensors file"):
        load("torchvision:resnet18", tmp_path / "bad.safetensors")
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="does not match the architecture"):
        load("torchvision:resnet18", tmp_path / "wrong.pth")


def test_offline_by_default_and_names_checked_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torchvision cache
    with pytest.raises(WeightsError, match=r"no weights for torchvision:resnet18: .*--allow-download"):
        load("torchvision:resnet18")
    with pytest.raises(WeightsError, match=r"no weights for timm:resnet18: .*--allow-download"):
        load("timm:resnet18")
    with pytest.raises(ValueError, match=r"torchvision has no classification model 'resnet5' \(did you mean"):
        unioncam.models.canonical("torchvision:resnet5")
    with pytest.raises(ValueError, match="timm has no model 'convnext_tinyy'"):
        unioncam.models.canonical("timm:convnext_tinyy")
    with pytest.raises(ValueError, match="unknown model family 'keras'"):
        unioncam.models.canonical("keras:resnet50")
    assert unioncam.models.canonical(" TorchVision:resnet50") == "torchvision:resnet50"
    # The torchvision cache is used when the standard file is already there (no download).
    torch.manual_seed(0)
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = tvm.get_model_weights("resnet18").DEFAULT.url
    torch.save(tvm.get_model("resnet18", weights=None).state_dict(), cache / url.rsplit("/", 1)[1])
    assert load("torchvision:resnet18").weights_sha256 is not None


def test_job_and_cli_take_family_names(tmp_path):
    from unioncam.service import ConfigError, EvalConfig

    cfg = EvalConfig.from_argv(["--shards", "x/*.tar", "--out", str(tmp_path / "o"), "--model",
                                "torchvision:resnet50", "--allow-download"], "imagenet")
    assert cfg.model == "torchvision:resnet50" and cfg.allow_download is True
    with pytest.raises(ConfigError, match="did you mean"):
        EvalConfig(shards="x/*.tar", out="o", model="torchvision:resnet5").resolved()


def test_an_unlisted_torchvision_family_gets_a_logged_dry_run_layer(tmp_path):
    torch.manual_seed(0)
    weights = random_weights(tmp_path, tvm.get_model("shufflenet_v2_x0_5", weights=None))
    with model_log() as records:
        loaded = load("torchvision:shufflenet_v2_x0_5", weights)
    assert loaded.target_layer == "conv5"
    assert any("explaining layer conv5" in r.getMessage() for r in records)
    smaller = load("torchvision:resnet18", random_weights(tmp_path, tvm.get_model("resnet18", weights=None), "r.pth"),
                   input_size=160)
    assert smaller.input_size == (160, 160) and smaller.resize_size == round(256 * 160 / 224)  # the crop ratio kept
