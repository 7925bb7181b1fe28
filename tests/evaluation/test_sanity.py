"""The cascading model parameter randomization test (unioncam.evaluation.sanity): the similarities against SciPy /
scikit-image, the cascade's order, seeds and isolation, known cases (the edge detector stays at 1,
Grad-CAM falls once its layer is random), failures, and quantus 0.6.0's MPRT side by side."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from skimage.metrics import structural_similarity
from torch import nn

import unioncam
from unioncam.data.sample import sample_photo_paths
from unioncam.engine import predict
from unioncam.evaluation.sanity import (
    ORIGINAL,
    EdgeDetector,
    cascade,
    layer_seed,
    parameterized_layers,
    sanity_check,
    spearman,
    ssim,
)
from unioncam.methods import get_method
from unioncam.viz import load_image

TINY_LAYERS = ["net.classifier", "net.features.3", "net.features.0"]  # top-down; target features.4 follows features.3


def photos(names: list[str], size: int) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in sample_photo_paths(names).values()])


@pytest.fixture(scope="module")
def tiny():
    lm = unioncam.load("tiny_cnn")
    return lm, photos(["chelsea", "coffee", "motorcycle", "grace_hopper"], 64)


@pytest.fixture(scope="module")
def real_maps(tiny):
    """Grad-CAM maps of the tiny CNN and of its fully randomized copy (ties: ReLU zeros)."""
    lm, x = tiny
    gc = get_method("gradcam")
    a = gc(lm.model)(x).maps
    *_, (_, random_model) = cascade(lm.model, seed=3)
    return a, gc(random_model)(x).maps


def scipy_spearman(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([scipy.stats.spearmanr(x.double().ravel().numpy(), y.double().ravel().numpy())[0]
                     for x, y in zip(a, b, strict=True)])


def skimage_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, **kw: object) -> np.ndarray:
    out = []
    for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True):
        r = max(x.max(), y.max()) - min(x.min(), y.min())  # quantus' similarity_func.ssim data range
        out.append(structural_similarity(x, y, data_range=r if data_range is None else data_range, **kw))
    return np.array(out)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- similarities ----------------------------------------------------------------------------------
def test_spearman_matches_scipy_random_ties_and_real_maps(real_maps):
    g = torch.Generator().manual_seed(0)
    cont = torch.rand(5, 20, 17, generator=g), torch.rand(5, 20, 17, generator=g)
    ties = (torch.rand(5, 20, 17, generator=g) * 4).floor(), (torch.rand(5, 20, 17, generator=g) * 3).floor()
    correlated = cont[0], cont[0] + 0.3 * cont[1]
    for a, b in (cont, ties, correlated, real_maps):
        np.testing.assert_allclose(spearman(a, b).numpy(), scipy_spearman(a, b), atol=1e-5)
    a64 = cont[0].double()
    np.testing.assert_allclose(spearman(a64, a64.flip(-1)).numpy(), scipy_spearman(a64, a64.flip(-1)), atol=1e-12)
    assert torch.equal(spearman(ties[0], ties[0]), torch.ones(5))
    assert (real_maps[0] == 0).any()  # the real maps do have ties


def test_spearman_constant_and_nan_maps():
    a = torch.rand(4, 8, 8)
    b = a.clone()
    b[0] = 0.0  # one constant → 0 (SciPy: NaN)
    a[1], b[1] = 0.0, 0.0  # both constant → 1
    a[2], b[2] = 0.5, 0.0  # both constant, different values: identical ranks → 1
    b[3, 0, 0] = torch.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(scipy_spearman(a[:1], b[:1])).all()
    rho = spearman(a, b)
    assert rho[:3].tolist() == [0.0, 1.0, 1.0]
    assert torch.isnan(rho[3])


def test_ssim_matches_skimage_random_and_real_maps(real_maps):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, 20, 17, generator=g), torch.rand(4, 20, 17, generator=g)
    smooth = scipy.ndimage.gaussian_filter(a.numpy(), (0, 2, 2))
    close = torch.from_numpy(smooth), torch.from_numpy(smooth) + 0.05 * b
    for x, y in ((a, b), close, real_maps):
        np.testing.assert_allclose(ssim(x, y).numpy(), skimage_ssim(x, y), atol=1e-5)
    np.testing.assert_allclose(ssim(a, b, data_range=2.0).numpy(), skimage_ssim(a, b, data_range=2.0), atol=1e-5)
    np.testing.assert_allclose(ssim(a, b, win_size=5).numpy(), skimage_ssim(a, b, win_size=5), atol=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(4))


def test_ssim_edge_cases():
    a = torch.zeros(3, 9, 9)
    b = torch.tensor([0.0, 0.5, 0.0])[:, None, None].expand(3, 9, 9).clone()
    b[2, 0, 0] = torch.inf
    out = ssim(a, b)
    assert out[0] == 1.0  # identical constant maps (R = 0; skimage: NaN)
    assert 0 < out[1] < 0.01  # another constant: R > 0, well defined (C1 / (0.25 + C1))
    assert torch.isnan(out[2])
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 6, 9), torch.rand(1, 6, 9))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(1, 9, 9), torch.rand(1, 9, 8))


def test_edge_detector_is_the_sobel_magnitude(tiny):
    _, x = tiny
    maps = EdgeDetector()(x).maps
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).double().numpy()
    for m, g in zip(maps, gray, strict=True):
        mag = np.hypot(scipy.ndimage.sobel(g, 0, mode="nearest"), scipy.ndimage.sobel(g, 1, mode="nearest"))
        np.testing.assert_allclose(m.numpy(), (mag - mag.min()) / (mag.max() - mag.min()), atol=1e-5)


# -- the cascade -----------------------------------------------------------------------------------
def test_cascade_order_seeds_and_isolation(tiny):
    lm, _ = tiny
    model = lm.model
    before, rng = state(model), torch.get_rng_state()
    assert [n for n, _ in parameterized_layers(model)] == TINY_LAYERS
    params = {n: [k for k in before if k.startswith(n + ".")] for n in TINY_LAYERS}
    steps = [(name, state(m)) for name, m in cascade(model, seed=5)]
    assert [n for n, _ in steps] == TINY_LAYERS
    for k, (_, s) in enumerate(steps):  # after step k the last k+1 layers are random, the others untouched
        for i, layer in enumerate(TINY_LAYERS):
            for key in params[layer]:
                assert torch.equal(s[key], before[key]) == (i > k), key
    again = [state(m) for _, m in cascade(model, seed=5)]
    assert all(same_state(a, b) for (_, a), b in zip(steps, again, strict=True))
    other = [state(m) for _, m in cascade(model, seed=6)]
    assert not torch.equal(other[0]["net.classifier.weight"], steps[0][1]["net.classifier.weight"])
    assert same_state(state(model), before) and torch.equal(torch.get_rng_state(), rng)
    assert layer_seed(5, 0) != layer_seed(5, 1) and layer_seed(5, 0) != layer_seed(6, 0)
    # every k-th, and named subsets: the same weights as the full cascade at those steps
    assert [n for n, _ in cascade(model, seed=5, layers=2)] == TINY_LAYERS[1:]
    named = [(n, state(m)) for n, m in cascade(model, seed=5, layers=["features.0", "net.classifier"])]
    assert [n for n, _ in named] == [TINY_LAYERS[0], TINY_LAYERS[2]]
    assert same_state(named[1][1], steps[2][1])
    with pytest.raises(ValueError, match="reset_parameters"):
        next(cascade(model, layers=["features.1"]))  # a ReLU


def test_sanity_check_tiny_cnn_known_cases(tiny):
    lm, x = tiny
    before = state(lm.model)
    methods = {"gradcam": get_method("gradcam"), "edges": EdgeDetector()}
    res = sanity_check(lm, methods, x, seed=0, batch_size=3)
    assert res.layers == [ORIGINAL, *TINY_LAYERS] and res.randomized == [0, 1, 2, 3]
    assert res.spearman.shape == res.ssim.shape == res.failed.shape == (2, 4, 4)
    assert not res.failed.any()
    assert torch.equal(res.targets, predict(lm.model, x)[0])
    gc, edges = 0, 1
    assert torch.allclose(res.spearman[:, 0], torch.ones(2, 4), atol=1e-6)  # step 0: nothing randomized
    assert torch.allclose(res.ssim[:, 0], torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(res.spearman[edges], torch.ones(4, 4), atol=1e-6)  # model-independent
    assert torch.allclose(res.ssim[edges], torch.ones(4, 4), atol=1e-6)
    assert res.spearman[gc, 2:].abs().max() < 0.45  # once the target layer's conv is random
    assert res.spearman[gc, 2:].mean() < 0.2 and res.ssim[gc, 2:].mean() < 0.2
    assert same_state(state(lm.model), before)
    # seeded: the same numbers again; another seed, other numbers
    again = sanity_check(lm.model, methods, x, res.targets, seed=0, batch_size=3)
    assert torch.equal(again.spearman, res.spearman) and torch.equal(again.ssim, res.ssim)
    whole = sanity_check(lm.model, methods, x, res.targets, seed=0)  # all images in one call
    assert torch.allclose(whole.spearman, res.spearman, atol=1e-4) and torch.allclose(whole.ssim, res.ssim, atol=1e-4)
    other = sanity_check(lm.model, ["gradcam"], x, res.targets, seed=1)
    assert not torch.allclose(other.spearman[0, 1:], res.spearman[gc, 1:])
    assert other.layer_seeds != res.layer_seeds and list(res.layer_seeds) == TINY_LAYERS
    # a subset of steps gives the full run's numbers at those steps
    sub = sanity_check(lm.model, ["gradcam"], x, res.targets, seed=0, layers=2, batch_size=3)
    assert sub.layers == [ORIGINAL, *TINY_LAYERS[1:]]
    assert torch.equal(sub.spearman[0], res.spearman[gc, [0, 2, 3]])
    rows = res.rows()
    assert len(rows) == 2 * 4 * 4
    assert rows[5] == {"method": "gradcam", "step": 1, "layer": "net.classifier", "randomized": 1, "image": 1,
                       "target": int(res.targets[1]), "spearman": float(res.spearman[gc, 1, 1]),
                       "ssim": float(res.ssim[gc, 1, 1]), "failed": False}


def test_cam_objects_are_rebound_to_the_copy(tiny):
    """A CAM object built on the model (with its own options) is deep-copied with the model: its
    layer and options carry over, and the object itself still explains the original."""
    lm, x = tiny
    layercam = get_method("layercam")
    cam = layercam(lm.model, "features.1")
    res = sanity_check(lm.model, {"lc": cam}, x, seed=2)
    ref = sanity_check(lm.model, {"lc": lambda m: layercam(m, "features.1")}, x, seed=2)
    assert torch.equal(res.spearman, ref.spearman) and torch.equal(res.ssim, ref.ssim)
    assert cam.model is lm.model and cam.layers[0] is lm.model.net.features[1]
    assert torch.equal(cam(x).maps, layercam(lm.model, "features.1")(x).maps)
    with pytest.raises(ValueError, match="another model"):
        sanity_check(lm.model, {"lc": layercam(unioncam.load("tiny_cnn").model)}, x)


def test_compiled_forward_is_not_used_by_the_copies(tiny):
    """A PixelModel's compiled forward is bound to the original module; the copies must drop it
    (Score-CAM's masked forwards run under inference mode, where it would be used)."""
    _, x = tiny
    model = unioncam.load("tiny_cnn").model
    plain = sanity_check(model, ["scorecam"], x[:2], seed=0)
    model._compiled = lambda t: model._forward(t)  # as torch.compile(model._forward): bound to the original
    try:
        assert all(m._compiled is None for _, m in cascade(model, layers=1))
        assert torch.equal(sanity_check(model, ["scorecam"], x[:2], seed=0).spearman, plain.spearman)
    finally:
        model._compiled = None


class NaNLinear(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, float("nan"))


class ZeroLinear(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


@pytest.mark.parametrize("head", [NaNLinear, ZeroLinear])
def test_nan_and_constant_maps_on_randomized_models(tiny, head):
    _, x = tiny
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net.append(head(8, 3))
        nn.Linear.reset_parameters(net[-1])
    lm = unioncam.load(net, target_layer="1", input_size=64)
    res = sanity_check(lm, {"gradcam": get_method("gradcam"), "edges": EdgeDetector}, x[:3], seed=0)
    assert res.layers == [ORIGINAL, "net.4", "net.0"]
    assert not res.failed[:, 0].any() and torch.allclose(res.spearman[:, 0], torch.ones(2, 3), atol=1e-6)
    assert not res.failed[1].any() and torch.allclose(res.spearman[1], torch.ones(3, 3), atol=1e-6)
    if head is NaNLinear:  # Grad-CAM refuses NaN logits: NaN and failed, no crash
        assert res.failed[0, 1:].all() and res.spearman[0, 1:].isnan().all() and res.ssim[0, 1:].isnan().all()
    else:  # zero head weights: zero gradients, an all-zero map, ρ = 0 by definition
        assert not res.failed.any() and torch.equal(res.spearman[0, 1:], torch.zeros(2, 3))
        assert torch.isfinite(res.ssim).all()


def test_efficientnet_gradcam_falls_on_a_real_photo():
    lm = unioncam.load("efficientnet_lite0")
    x = photos(["grace_hopper", "chelsea"], 224)
    res = sanity_check(lm, {"gradcam": get_method("gradcam"), "edges": EdgeDetector()}, x, [652, 281],
                       layers=["body._fc", "body._conv_head"], seed=0)
    assert res.layers == [ORIGINAL, "net.body._fc", "net.body._conv_head"] and res.randomized == [0, 1, 3]
    assert torch.allclose(res.spearman[:, 0], torch.ones(2, 2), atol=1e-6)
    assert torch.allclose(res.spearman[1], torch.ones(3, 2), atol=1e-6)  # edges
    assert (res.spearman[0, 2] < 0.4).all() and res.ssim[0, 2].mean() < 0.5  # _bn1 and _conv_head random


# -- quantus 0.6.0 ---------------------------------------------------------------------------------
def _quiet_mprt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, explain, similarity=None) -> dict:
    """quantus.MPRT (top-down, seed 42, its default abs/normalise) on our maps, with its output
    silenced and its global reseeding (torch.manual_seed) kept out of the test session."""
    import quantus

    def explain_func(model, inputs, targets, **_):
        maps = explain(model)(torch.from_numpy(inputs), torch.from_numpy(np.asarray(targets))).maps
        return maps.double().numpy()[:, None]

    kw = {} if similarity is None else {"similarity_func": similarity}
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False, **kw)
        return metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=explain_func, device="cpu",
                      batch_size=len(x))


def test_quantus_mprt_same_layers_weights_and_numbers(tiny):
    """quantus' MPRT on our maps: same layer order, the same re-initialized weights (seeding="quantus"
    follows its torch.manual_seed(seed + 1) before every reset_parameters()), the same Spearman per
    layer and image, and its own SSIM (similarity_func.ssim on each 2-D map: MPRT itself flattens
    the maps, and its batched ssim returns a list MPRT cannot take) equal to ours."""
    from quantus.functions.similarity_func import ssim as quantus_ssim

    lm, x = tiny
    x = x[:3]
    y = predict(lm.model, x)[0]
    h, w = x.shape[-2:]

    def ssim_2d(a, b, batched=True, **_):
        return np.array([quantus_ssim(p.reshape(h, w), q.reshape(h, w)) for p, q in zip(a, b, strict=True)])

    for name, explain in (("gradcam", get_method("gradcam")), ("edges", EdgeDetector)):
        ours = sanity_check(lm.model, {name: explain}, x, y, seed=42, seeding="quantus")
        rho = _quiet_mprt(lm.model, x, y, explain)
        sim = _quiet_mprt(lm.model, x, y, explain, ssim_2d)
        assert list(rho) == list(sim) == ours.layers == [ORIGINAL, *TINY_LAYERS]
        for s, layer in enumerate(ours.layers):
            np.testing.assert_allclose(ours.spearman[0, s].numpy(), rho[layer], atol=1e-5, err_msg=f"{name} {layer}")
            np.testing.assert_allclose(ours.ssim[0, s].numpy(), sim[layer], atol=1e-5, err_msg=f"{name} {layer}")
        if name == "gradcam":
            assert np.mean(rho["net.features.0"]) < 0.5  # the comparison is not vacuous


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_lite0"])
def test_quantus_generator_gives_the_same_weights(name):
    """Bit-identical weights at every step of quantus' get_random_layer_generator(top_down, 42) and
    cascade(seeding="quantus"); EfficientNet-Lite0 covers BatchNorm, same-padding convs, FP32Linear."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    model = unioncam.load(name).model
    with torch.random.fork_rng(devices=[]):
        theirs = PyTorchModel(model).get_random_layer_generator(order="top_down", seed=42)
        n = 0
        for (a, qa), (b, ob) in zip(theirs, cascade(model, seed=42, seeding="quantus"), strict=True):
            assert a == b
            assert same_state(qa.state_dict(), ob.state_dict()), a
            n += 1
    assert n == len(parameterized_layers(model))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weights_and_similarities_equal_cpu(tiny):
    lm, x = tiny
    cpu = [state(m) for _, m in cascade(lm.model, seed=7)]
    gpu_model = unioncam.load("tiny_cnn").model.cuda()
    gpu = [{k: v.cpu() for k, v in m.state_dict().items()} for _, m in cascade(gpu_model, seed=7)]
    assert all(same_state(a, b) for a, b in zip(cpu, gpu, strict=True))
    a, b = torch.rand(3, 40, 40, dtype=torch.float64), torch.rand(3, 40, 40, dtype=torch.float64)
    assert torch.allclose(spearman(a.cuda(), b.cuda()).cpu(), spearman(a, b), atol=1e-12)
    assert torch.allclose(ssim(a.cuda(), b.cuda()).cpu(), ssim(a, b), atol=1e-12)
    res = sanity_check(gpu_model, ["gradcam"], x.cuda(), seed=0)
    ref = sanity_check(lm.model, ["gradcam"], x, seed=0)
    assert torch.allclose(res.spearman, ref.spearman, atol=1e-4)
