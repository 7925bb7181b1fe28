"""The method API of the "any classifier" issue: hooks scoped to a call, training flags restored
exactly, integrativecam refusing a target_layer, transformers (ViT, Swin) through a token reshape
checked against pytorch-grad-cam, one parser for method and metric names, and the CLI's defaults
agreeing with the job's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from applicable import methods_for_tiny_cnn
from torch import nn

import unioncam
from unioncam.methods import METHODS, get_method
from unioncam.models import PixelModel, load

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def tiny() -> nn.Module:
    return load("tiny_cnn").model


# -- 1. hooks are scoped to a call --------------------------------------------------------------
@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_hooks_exist_only_during_the_explaining_forward(tiny, method):
    x = images(2)
    cam = get_method(method)(tiny, batch_size=8)
    assert forward_hooks(tiny) == 0  # construction hooks nothing
    cam(x)  # integrativecam discovers its layers on the first call
    assert cam.layers and all(len(layer._forward_hooks) == 0 for layer in cam.layers)
    assert forward_hooks(tiny) == 0
    seen: list[int] = []
    probe = tiny.net.register_forward_pre_hook(lambda m, i: seen.append(forward_hooks(tiny)))
    try:
        again = cam(x)
    finally:
        probe.remove()
    assert seen[0] == len(cam.layers)  # the explaining forward is hooked ...
    # ... the masked forwards (Score-CAM, UnionCAM) are not; those that replace or read the target
    # layer (Ablation-CAM, SmoothGrad-CAM++: CAM.hooked_forwards) hook it alone
    assert all(n == (1 if cam.hooked_forwards else 0) for n in seen[1:])
    assert forward_hooks(tiny) == 0
    assert again.maps.shape == (2, 64, 64)


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_no_hook_is_left_after_an_exception_inside_the_call(tiny, method):
    x = images(1)
    cam = get_method(method)(tiny, batch_size=8)
    cam(x)
    boom = tiny.net.classifier.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):  # raised inside the explaining forward
            cam(x)
    finally:
        boom.remove()
    assert forward_hooks(tiny) == 0 and all(len(layer._forward_hooks) == 0 for layer in cam.layers)
    with pytest.raises(ValueError, match="targets must lie"):  # raised after the forward
        cam(x, targets=[99])
    assert forward_hooks(tiny) == 0
    assert cam(x).maps.shape == (1, 64, 64)  # still usable


def test_close_protocol_still_works(tiny):
    x = images(1)
    with get_method("gradcam")(tiny) as cam:
        cam(x)
    with pytest.raises(RuntimeError, match="closed"):
        cam(x)
    other = get_method("gradcam")(tiny)
    other.remove_hooks()
    other.remove_hooks()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        other(x)
    del other
    assert forward_hooks(tiny) == 0


def test_a_bad_layer_name_still_fails_at_construction(tiny):
    with pytest.raises(ValueError, match=r"no layer 'features\.99'"):
        get_method("gradcam")(tiny, "features.99")


# -- 2. training flags restored exactly ---------------------------------------------------------
@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_every_submodules_training_flag_is_restored(tiny, method):
    tiny.train()
    tiny.net.features[0].eval()
    before = {name: m.training for name, m in tiny.named_modules()}
    modes_seen: list[bool] = []
    probe = tiny.net.register_forward_pre_hook(
        lambda m, i: modes_seen.append(any(mod.training for mod in tiny.modules())))
    try:
        unioncam.explain(tiny, images(2), method, batch_size=8)
    finally:
        probe.remove()
    assert not any(modes_seen)  # every forward of the call ran in eval mode
    assert {name: m.training for name, m in tiny.named_modules()} == before
    assert tiny.training and not tiny.net.features[0].training


def test_training_flags_are_restored_after_an_exception(tiny):
    tiny.train()
    tiny.net.features[3].eval()
    before = {name: m.training for name, m in tiny.named_modules()}
    boom = tiny.net.classifier.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            unioncam.explain(tiny, images(1), "gradcam")
    finally:
        boom.remove()
    assert {name: m.training for name, m in tiny.named_modules()} == before


# -- 3. integrativecam refuses a target_layer -----------------------------------------------------
def test_integrativecam_refuses_a_target_layer_it_would_ignore(tiny):
    with pytest.raises(ValueError, match=r"takes no target_layer \(got 'features.4'\); pass layers="):
        get_method("integrativecam")(tiny, "features.4")
    with pytest.raises(ValueError, match="takes no target_layer"):
        unioncam.explain(tiny, images(1), "integrativecam", target_layer=tiny.net.features[1])
    # no target_layer (the model's default attribute is not one): its own layers, or layers=[...]
    default = unioncam.explain(tiny, images(1), "integrativecam")
    assert default.details["layers"] == ["net.features.1", "net.features.4"]
    one = unioncam.explain(tiny, images(1), "integrativecam", layers=["features.4"])
    assert one.details["layers"] == ["net.features.4"]


# -- 4. transformers through a token reshape --------------------------------------------------------
def test_vit_reshape_and_nhwc_to_nchw():
    from unioncam.ops import nhwc_to_nchw, vit_reshape

    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).view(2, 17, 5)
    grid = vit_reshape(1)(tokens)
    assert grid.shape == (2, 5, 4, 4)
    for i, j in ((0, 0), (1, 3), (3, 2)):
        torch.testing.assert_close(grid[:, :, i, j], tokens[:, 1 + 4 * i + j, :], rtol=0, atol=0)
    assert vit_reshape(0)(tokens[:, 1:]).equal(grid)
    with pytest.raises(ValueError, match="not a square grid"):
        vit_reshape(2)(tokens)
    with pytest.raises(ValueError, match="B×N×C"):
        vit_reshape(1)(grid)
    nhwc = torch.randn(2, 3, 4, 6)
    assert nhwc_to_nchw(nhwc).equal(nhwc.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="B×H×W×C"):
        nhwc_to_nchw(tokens)
    import pickle

    assert pickle.loads(pickle.dumps(vit_reshape(1)))(tokens).equal(grid)  # can travel to Ray workers


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@pytest.fixture(scope="module")
def vit():
    timm = pytest.importorskip("timm")
    net = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10))
    return PixelModel(net, MEAN, STD).eval(), net.blocks[-1].norm1, 224


@pytest.fixture(scope="module")
def vit_small():
    """The same architecture at 64×64 (a 4×4 grid), for the score methods' 192 channel forwards."""
    timm = pytest.importorskip("timm")
    net = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64))
    return PixelModel(net, MEAN, STD).eval(), net.blocks[-1].norm1, 64


@pytest.fixture(scope="module")
def swin():
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    net = _seeded(lambda: SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1),
                                          num_heads=(1, 2), num_classes=10))
    return PixelModel(net, MEAN, STD).eval(), net.layers[-1].blocks[-1], 64


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


PGC = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}


def _pgc_class(pgc, method: str):
    """pytorch-grad-cam's class for ``method``; for Grad-CAM++ its ``get_cam_weights`` without the
    ``+1e-6`` it adds to α's denominator: with a random transformer's gradients (g ~ 1e-3, so
    g² ~ 1e-6) that constant changes the map (Pearson ≈ 0.8 with it, 1.0 without)."""
    cls = getattr(pgc, PGC[method])
    if method != "gradcampp":
        return cls

    class GradCAMPlusPlusNoEps(cls):
        def get_cam_weights(self, input_tensor, target_layers, target_category, activations, grads):
            g2 = grads**2
            denom = 2 * g2 + activations.sum(axis=(2, 3), keepdims=True) * g2 * grads
            aij = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
            return (np.maximum(grads, 0) * np.where(grads != 0, aij, 0)).sum(axis=(2, 3))

    return GradCAMPlusPlusNoEps


def _against_pytorch_grad_cam(model, layer, size, reshape, method, seed):
    """Our map at a transformer layer against pytorch-grad-cam's with the same ``reshape_transform``:
    (1) our map equals our formula applied to the activations and gradients pytorch-grad-cam captured
    (its gradient is taken w.r.t. the raw tokens, then reshaped: the same plumbing); (2) the two
    end-to-end maps agree (both: ReLU of the raw map, min-max, bilinear to the input size, cv2 there,
    torch here)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from unioncam.ops import normalize, upsample

    x = images(2, size, seed)
    ours = unioncam.explain(model, x, method, target_layer=layer, reshape=reshape)
    with _pgc_class(pgc, method)(model, target_layers=[layer], reshape_transform=reshape) as ref:
        theirs = ref(x, targets=[ClassifierOutputTarget(int(c)) for c in ours.targets])
        acts, grads = ref.activations_and_grads.activations[0], ref.activations_and_grads.gradients[0]
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam calls backward()
    assert acts.dim() == 4 and acts.shape == grads.shape and acts.shape[0] == 2
    raw, _ = get_method(method)(model, layer, reshape=reshape).compute(x, ours.targets, acts, grads, None)
    torch.testing.assert_close(ours.maps, normalize(upsample(raw, (size, size))), atol=1e-4, rtol=0)
    assert ours.maps.shape == (2, size, size) and theirs.shape == (2, size, size)
    for i in range(2):
        assert float(ours.maps[i].max()) == 1.0 and float((ours.maps[i] > 0).float().mean()) > 0.5  # not degenerate
        assert _pearson(ours.maps[i].numpy(), theirs[i]) >= 0.999
        np.testing.assert_allclose(ours.maps[i].numpy(), theirs[i], atol=1e-3)


@pytest.mark.parametrize("method", sorted(PGC))
def test_vit_gradient_methods_match_pytorch_grad_cam(vit, method):
    from unioncam.ops import vit_reshape

    model, layer, size = vit
    _against_pytorch_grad_cam(model, layer, size, vit_reshape(1), method, seed=1)


@pytest.mark.parametrize("method", sorted(PGC))
def test_swin_gradient_methods_match_pytorch_grad_cam(swin, method):
    from unioncam.ops import nhwc_to_nchw, vit_reshape

    model, block, size = swin
    _against_pytorch_grad_cam(model, block.norm2, size, vit_reshape(0), method, seed=2)  # B×(H·W)×C
    _against_pytorch_grad_cam(model, block.norm1, size, nhwc_to_nchw, method, seed=3)  # B×H×W×C


@pytest.mark.parametrize("arch", ["vit_small", "swin"])
def test_score_methods_run_on_transformers(request, arch):
    from unioncam.methods.score import region_map
    from unioncam.ops import vit_reshape

    model, layer, size = request.getfixturevalue(arch)
    layer = layer if arch == "vit_small" else layer.norm2
    reshape = vit_reshape(1 if arch == "vit_small" else 0)
    x = images(2, size, seed=4)
    score = unioncam.explain(model, x, "scorecam", target_layer=layer, reshape=reshape, batch_size=64)
    union = unioncam.explain(model, x, "unioncam", target_layer=layer, reshape=reshape, batch_size=64)
    for result in (score, union):
        assert result.maps.shape == (2, size, size)
        assert torch.isfinite(result.maps).all()
        assert float(result.maps.min()) >= 0.0 and float(result.maps.max()) <= 1.0
    assert set(union.details["selected"]) <= {"dereg", "region"} and all(union.details["selected"])
    # Score-CAM's masks are the reshaped grid's channels, upsampled to the input
    raw: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, out: raw.__setitem__("a", out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    expected, _ = region_map(model, x, score.targets, reshape(raw["a"]), batch_size=64)
    torch.testing.assert_close(score.maps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(union.details["region_map"], score.maps, atol=1e-5, rtol=0)


def test_token_output_without_a_reshape_says_what_to_pass(vit_small):
    model, layer, size = vit_small
    with pytest.raises(RuntimeError, match=r"B×K×h×w tensor, got \(1, 17, 192\); pass reshape=\.\.\."):
        unioncam.explain(model, images(1, size), "gradcam", target_layer=layer)


def test_a_model_can_carry_its_reshape(vit_small):
    from unioncam.ops import vit_reshape

    model, layer, size = vit_small
    x = images(2, size, seed=5)
    explicit = unioncam.explain(model, x, "gradcam", target_layer=layer, reshape=vit_reshape(1))
    carrier = PixelModel(model.net, MEAN, STD).eval()
    carrier.reshape_transform = vit_reshape(1)
    carried = unioncam.explain(carrier, x, "gradcam", target_layer=layer)
    assert carried.maps.equal(explicit.maps)
    with pytest.raises(RuntimeError, match="reshape must turn the layer's output"):
        unioncam.explain(model, x, "gradcam", target_layer=layer, reshape=lambda t: t[:, 1:])


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_4d_layers_are_unchanged_by_an_identity_reshape(tiny, method):
    x = images(2, seed=6)
    plain = unioncam.explain(tiny, x, method, batch_size=8)
    same = unioncam.explain(tiny, x, method, batch_size=8, reshape=lambda a: a)
    assert same.maps.equal(plain.maps) and same.targets.equal(plain.targets)


# -- 5. one parser for method and metric names -----------------------------------------------------
def test_methods_and_metrics_share_one_parser():
    from unioncam.evaluation import METRICS
    from unioncam.methods import parse_methods
    from unioncam.registry import UnknownNameError, parse_names

    def metrics(spec):
        return parse_names(spec, METRICS.names(), "metric")

    assert parse_methods("all") == parse_methods(" ALL ") == METHODS.names()
    assert metrics("all") == metrics([" All"]) == METRICS.names()
    assert parse_methods(" GradCAM , unioncam ") == ["gradcam", "unioncam"]
    assert metrics(" AD , insdel ") == ["ad", "insdel"]
    assert parse_methods(["gradcam", " LayerCAM,gradcam"]) == ["gradcam", "layercam"]  # lists, duplicates
    assert metrics("ad,AD, ai ,ad") == ["ad", "ai"]
    assert parse_names("Lite-0, lite_0", ["lite_0"], "model") == ["lite_0"]  # '-' and '_' alike
    with pytest.raises(UnknownNameError, match=r"unknown method\(s\) gradcan \(did you mean 'gradcam'\?\); "
                                               r"valid: gradcam, gradcampp"):
        parse_methods("gradcan, unioncam")
    with pytest.raises(UnknownNameError, match=r"unknown metric\(s\) insdl \(did you mean 'insdel'\?\), auc; "
                                               r"valid: ad, ai, insdel, epg"):
        metrics("ad, insdl, auc")
    for parse, kind in ((parse_methods, "method"), (metrics, "metric")):
        with pytest.raises(ValueError, match=f"no {kind} given"):
            parse(" , ")
    assert parse_names("", METRICS.names(), "metric", empty_ok=True) == []


# -- 6. the CLI's and the job's defaults agree ----------------------------------------------------
def test_cli_explain_defaults_agree_with_the_job():
    from unioncam.cli import build_parser
    from unioncam.service.config import EvalConfig

    args = build_parser().parse_args(["explain", "x.png", "--out", "o"])
    job = EvalConfig()
    assert args.channels_last is job.channels_last is True
    assert args.fuse is job.fuse is True
    assert args.precision == job.precision == "auto"
    assert args.compile is job.compile is None  # both: on with CUDA, off on CPU
    assert args.batch_size is job.batch_size is None  # both: 4 on CPU, from the GPU's memory on CUDA
    from unioncam.evaluation.protocols import get_protocol

    curves = get_protocol(args.protocol).curves  # both: the protocol's steps (reference: 224)
    assert args.steps is None and curves is not None
    assert curves.steps == EvalConfig(shards="x-*.tar", out="o").resolved().insdel_steps == 224
    off = build_parser().parse_args(["explain", "x.png", "--out", "o", "--no-channels-last"])
    assert off.channels_last is False
    assert build_parser().parse_args(["explain", "x.png", "--out", "o", "--channels-last"]).channels_last is True
    assert build_parser().parse_args(["explain", "x.png", "--out", "o", "--no-fuse"]).fuse is False
    assert EvalConfig.from_argv(["--shards", "x-*.tar", "--out", "o", "--no-fuse"], "imagenet").fuse is False


def test_cli_explain_loads_channels_last_by_default(tmp_path, monkeypatch):
    from PIL import Image

    from unioncam import cli

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(photo)
    calls: list[dict] = []
    real = cli.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "load", spy)
    for extra in ([], ["--no-channels-last"]):
        argv = ["explain", str(photo), "--model", "tiny_cnn", "--method", "gradcam", "--device", "cpu",
                "--out", str(tmp_path / "o"), *extra]
        assert cli.main(argv) == 0
    assert [c["channels_last"] for c in calls] == [True, False]
    assert [c["fuse"] for c in calls] == [True, True]
    assert [c["compile"] for c in calls] == [False, False]  # CPU


# -- targets as callables on the logits (pytorch-grad-cam's idiom) ------------------------------------
def test_callable_targets_in_pytorch_grad_cams_idiom():
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget as TheirSoftmax

    from unioncam import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    loaded = unioncam.load("tiny_cnn")
    x = images(2)
    plain = unioncam.explain(loaded, x, "gradcam", targets=[3, 7])
    as_logit = unioncam.explain(loaded, x, "gradcam", targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    assert torch.equal(as_logit.maps, plain.maps) and as_logit.targets.tolist() == [3, 7]
    # The softmax target explains ∂p_c/∂A: equal to pytorch-grad-cam's with its own softmax target.
    ours = unioncam.explain(loaded, x, "gradcam", targets=[ClassifierOutputSoftmaxTarget(3)] * 2).maps
    layer = loaded.model.net.get_submodule(loaded.target_layer)
    with TheirGradCAM(model=loaded.model, target_layers=[layer]) as cam:
        theirs = cam(input_tensor=x.clone().requires_grad_(True), targets=[TheirSoftmax(3)] * 2)
    for i in range(2):
        assert np.corrcoef(ours[i].numpy().ravel(), theirs[i].ravel())[0, 1] >= 0.999
    # Any callable for the gradient methods (its class is unknown: -1) ...
    contrast = unioncam.explain(loaded, x, "gradcam", targets=[lambda z: z[3] - z[7]] * 2)
    assert contrast.targets.tolist() == [-1, -1] and not torch.equal(contrast.maps, plain.maps)
    # ... while the score-based methods need the class whose softmax probability they score.
    with pytest.raises(ValueError, match="scorecam scores the target class's softmax probability"):
        unioncam.explain(loaded, x, "scorecam", targets=[lambda z: z[3]] * 2)
    score = unioncam.explain(loaded, x, "scorecam", targets=[ClassifierOutputTarget(3)] * 2)
    assert torch.equal(score.maps, unioncam.explain(loaded, x, "scorecam", targets=[3, 3]).maps)
    with pytest.raises(ValueError, match="one callable per image"):
        unioncam.explain(loaded, x, "gradcam", targets=[ClassifierOutputTarget(3)])


def test_images_outside_pixel_range_are_refused_with_the_reason():
    loaded = unioncam.load("tiny_cnn")
    x = images(1)
    for bad, shown in ((x * 255, ", 255]"), ((x - 0.45) / 0.225, "[-2")):
        with pytest.raises(ValueError, match=r"images must be pixels in \[0, 1\]") as refused:
            unioncam.explain(loaded, bad, "gradcam")
        assert shown in str(refused.value)
    assert unioncam.explain(loaded, x.clamp(0, 1), "gradcam").maps.shape == (1, 64, 64)
