"""Issue 26's remaining methods against the libraries that define them (pytorch-grad-cam 1.5.7, TorchCAM 0.5.0)
or, for Group-CAM (no library ships it), an independent loop written from the authors' code.

* On float64 networks each deterministic method equals its reference to 1e-5, after the same upsampling
  and min-max normalization; each check also shows the method is not a method we already had.
* On the real EfficientNet-Lite0 with real photos, each equals its reference with Pearson ≥ 0.999 per
  image, same layer and class.
* SmoothGrad-CAM++ (seeded): the same seed gives the same maps whatever the batch, and equals TorchCAM's
  given the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn

import unioncam
from unioncam.methods import families, get_method, parse_methods
from unioncam.ops import normalize, upsample

pgc = pytest.importorskip("pytorch_grad_cam")
torchcam = pytest.importorskip("torchcam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

NEW = ("smoothgradcampp", "shapleycam", "finercam", "kpcacam", "refinecam", "groupcam")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])




def release(cam) -> None:
    """Remove a pytorch-grad-cam object's hooks (RefineCAM and FinerCAM wrap base CAMs)."""
    for base in getattr(cam, "base_cam_per_layer", None) or [getattr(cam, "base_cam", cam)]:
        base.activations_and_grads.release()


def pgc_maps(cls, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, targets, **call) -> np.ndarray:
    """pytorch-grad-cam's maps (``B×H×W`` float32, min-max normalized at input size)."""
    with ref.trainable(model):
        cam = cls(model=model, target_layers=layers)
        try:
            return cam(input_tensor=x.clone(), targets=targets, **call)
        finally:
            release(cam)


def logit_targets(classes) -> list[ClassifierOutputTarget]:
    return [ClassifierOutputTarget(int(c)) for c in classes]


# -- networks -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny64():
    """tiny_cnn (conv, ReLU, pool, conv, ReLU, global average pooling, linear) in float64."""
    loaded = unioncam.load("tiny_cnn")
    model = loaded.model.double().eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return model, model.net.get_submodule(loaded.target_layer), x


@pytest.fixture(scope="module")
def curved():
    """A float64 network whose head after the target layer (the second conv) is curved (tanh,
    softplus), so second derivatives are not zero; 7 classes, 16×16 inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(12, 8, 1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7))
    model = unioncam.load(net, target_layer="2", input_size=16).model.double().eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, net[2], x




def test_the_new_methods_are_registered_with_their_families():
    fams = families()
    assert {"smoothgradcampp", "shapleycam", "finercam", "refinecam"} <= set(fams["gradient"])
    assert "groupcam" in fams["score"] and "kpcacam" in fams["activation"]
    assert parse_methods("all")[-len(NEW) - 1:-1] == list(NEW)  # then legrad (tests/methods/test_legrad.py)
    assert [m for m in NEW if get_method(m).seeded] == ["smoothgradcampp"]
    assert get_method("smoothgradcampp").detail_columns() == {"seed": "int64"}


# -- SmoothGrad-CAM++ (TorchCAM) ----------------------------------------------------------------------
def torchcam_smoothgrad(model: nn.Module, layer: str, x: torch.Tensor, targets: list[int], seed: int,
                        **options) -> torch.Tensor:
    """TorchCAM's SmoothGradCAMpp image by image (its noise is drawn for the whole batch), each after
    ``torch.manual_seed(seed)``, upsampled and normalized as ours."""
    from torchcam.methods import SmoothGradCAMpp

    out = []
    for i, c in enumerate(targets):
        with SmoothGradCAMpp(model, target_layer=layer, input_shape=tuple(x.shape[1:]), **options) as cam:
            model(x[i : i + 1])
            torch.manual_seed(seed)
            low = cam(class_idx=[c])[0]
        out.append(normalize(upsample(low.detach(), tuple(x.shape[-2:])))[0])
    return torch.stack(out)


def test_smoothgradcampp_equals_torchcam_given_the_same_noise_whatever_the_batch(tiny64):
    model, layer, x = tiny64
    ours = unioncam.explain(model, x, "smoothgradcampp", num_samples=3, seed=5)
    assert ours.details["seed"] == [5, 5, 5] and ours.details["forwards"].tolist() == [3, 3, 3]
    theirs = torchcam_smoothgrad(model, "net.features.4", x, ours.targets.tolist(), 5, num_samples=3)
    torch.testing.assert_close(ours.maps, theirs, atol=1e-5, rtol=0)
    for i in range(3):
        one = unioncam.explain(model, x[i : i + 1], "smoothgradcampp", num_samples=3, seed=5, batch_size=1)
        torch.testing.assert_close(one.maps[0], ours.maps[i], atol=1e-10, rtol=0)
    other = unioncam.explain(model, x, "smoothgradcampp", num_samples=3, seed=6)
    assert float((other.maps - ours.maps).abs().max()) > 1e-3  # the seed matters
    # TorchCAM's quirk is kept: the map combines the last noisy sample's activations, not the clean ones
    grads: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []
    gen = [torch.Generator().manual_seed(5) for _ in range(3)]
    for _ in range(3):
        noise = torch.stack([torch.normal(0.0, 0.3, (3, 64, 64), generator=g) for g in gen]).double()
        handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
        try:
            logits = model((x + noise).requires_grad_(True))
        finally:
            handle.remove()
        grads.append(torch.autograd.grad(logits.gather(1, ours.targets[:, None]).sum(), acts[-1])[0])
    with torch.no_grad():
        clean = model.net.features((x - model.mean) / model.std)
    d2 = torch.stack(grads).pow(2).mean(0)
    d3 = torch.stack(grads).pow(3).mean(0)
    alpha = d2 / (2 * d2 + (d3 * clean).sum(dim=(2, 3), keepdim=True) + 1e-8)
    w = (alpha * grads[-1].clamp_min(0)).sum(dim=(2, 3))
    quirk = normalize(upsample(torch.einsum("bk,bkhw->bhw", w, acts[-1].detach()).clamp_min(0), (64, 64)))
    torch.testing.assert_close(ours.maps, quirk, atol=1e-10, rtol=0)
    with_clean = normalize(upsample(torch.einsum("bk,bkhw->bhw", w, clean).clamp_min(0), (64, 64)))
    assert float((with_clean - ours.maps).abs().max()) > 0.05


def test_lite0_smoothgradcampp_matches_torchcam(lite0):
    loaded, _, x = lite0
    ours = unioncam.explain(loaded, x, "smoothgradcampp", seed=0)
    theirs = torchcam_smoothgrad(loaded.model, f"net.{loaded.target_layer}", x, ours.targets.tolist(), 0)
    for i in range(x.shape[0]):
        assert float((ours.maps[i] > 0.05).float().mean()) > 0.02  # not degenerate
        assert pearson(ours.maps[i].numpy(), theirs[i].numpy()) >= 0.999


# -- ShapleyCAM, Finer-CAM, KPCA-CAM (pytorch-grad-cam) --------------------------------------------------
def test_shapleycam_equals_pytorch_grad_cam_where_the_head_is_curved(curved):
    model, layer, x = curved
    ours = unioncam.explain(model, x, "shapleycam", target_layer=layer)
    theirs = pgc_maps(pgc.ShapleyCAM, model, [layer], x, logit_targets(ours.targets))
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    gradcam = unioncam.explain(model, x, "gradcam", target_layer=layer)
    assert float((gradcam.maps - ours.maps).abs().max()) > 0.01  # H·A is not zero here


def test_shapleycam_is_gradcam_after_a_piecewise_linear_head(tiny64):
    model, _, x = tiny64  # ReLU, then global average pooling and a linear layer: the Hessian is 0
    ours = unioncam.explain(model, x, "shapleycam")
    torch.testing.assert_close(ours.maps, unioncam.explain(model, x, "gradcam").maps, atol=1e-12, rtol=0)


def test_shapleycam_on_a_vision_transformer_equals_finite_differences():
    """Attention's fused kernels have no second derivative: the explaining forward runs PyTorch's math
    kernel. The reference: ``H·A`` by central differences of the gradient along ``A`` (float64), then
    pytorch-grad-cam's formula on the reshaped tokens (its own ShapleyCAM fails with a
    ``reshape_transform``: it reshapes the activations for the weights only)."""
    timm = pytest.importorskip("timm")
    from unioncam.models import PixelModel
    from unioncam.ops import vit_reshape

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    model = PixelModel(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    layer, grid = net.blocks[-1].norm1, vit_reshape(1)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    in_fp32 = unioncam.explain(model, x.float(), "shapleycam", target_layer=layer, reshape=grid)  # fused kernels
    model.double()
    ours = unioncam.explain(model, x, "shapleycam", target_layer=layer, reshape=grid)
    torch.testing.assert_close(in_fp32.maps, ours.maps.float(), atol=1e-3, rtol=0)

    def grad_at(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens ``scale · A`` put in place of the layer's output, and the gradient there."""
        seen: list[torch.Tensor] = []

        def replace(_m, _i, out):
            seen.append((out * scale).detach().requires_grad_(True))
            return seen[-1]

        handle = layer.register_forward_hook(replace)
        try:
            score = model(x).gather(1, ours.targets[:, None]).sum()
        finally:
            handle.remove()
        return seen[0].detach(), torch.autograd.grad(score, seen[0])[0]

    eps = 1e-4
    acts, g = grad_at(1.0)
    hvp = (grad_at(1 + eps)[1] - grad_at(1 - eps)[1]) / (2 * eps)
    w = (grid(g) - 0.5 * grid(hvp)).mean(dim=(2, 3))
    plain = normalize(upsample(torch.einsum("bk,bkhw->bhw", w, grid(acts)).clamp_min(0), (64, 64)))
    torch.testing.assert_close(ours.maps, plain, atol=1e-5, rtol=0)
    gradcam = unioncam.explain(model, x, "gradcam", target_layer=layer, reshape=grid)
    assert float((gradcam.maps - ours.maps).abs().max()) > 0.01  # H·A is not zero


def test_finercam_equals_pytorch_grad_cam(curved):
    model, layer, x = curved
    ours = unioncam.explain(model, x, "finercam", target_layer=layer)  # the predicted classes
    theirs = pgc_maps(pgc.FinerCAM, model, [layer], x, None)
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)
    gradcam = unioncam.explain(model, x, "gradcam", target_layer=layer)
    assert float((gradcam.maps - ours.maps).abs().max()) > 0.1
    # a given class (pytorch-grad-cam's target_idx), another α and other comparison ranks
    options = {"alpha": 0.5, "comparison_ranks": (1, 4)}
    ours = unioncam.explain(model, x, "finercam", target_layer=layer, targets=[2, 2, 2], **options)
    theirs = pgc_maps(pgc.FinerCAM, model, [layer], x, None, target_idx=2, alpha=0.5, comparison_categories=[1, 4])
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)


def test_finercam_comparison_classes_and_score_by_hand():
    from unioncam.methods.finer import comparison_classes, finer_score

    z = torch.tensor([[0.0, 3.0, 2.5, 4.0, 2.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1])
    # |z − 3| = [3, 0, .5, 1, .5, 4]: ranks 1, 2 (ties in class order), 3 are classes 2, 4, 3
    assert comparison_classes(z.detach(), t, (1, 2, 3)).tolist() == [[2, 4, 3]]
    p = z.detach().softmax(-1)[0]
    expected = sum(p[j] * (3.0 - 0.5 * z[0, j].item()) for j in (2, 4, 3)) / (p[2] + p[4] + p[3] + 1e-9)
    assert float(finer_score(z, t, (1, 2, 3), 0.5).detach()) == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="finercam: comparison_ranks"):
        unioncam.explain(unioncam.load("tiny_cnn"), torch.rand(1, 3, 32, 32), "finercam", comparison_ranks=(0,))


def kpca_reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, kernel: str) -> np.ndarray:
    class Kernel(pgc.KPCA_CAM):
        def __init__(self, model, target_layers):
            super().__init__(model, target_layers, kernel=kernel)

    return pgc_maps(Kernel, model, [layer], x, None)


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "poly", "linear", "cosine"])
def test_kpcacam_equals_pytorch_grad_cam(curved, kernel):
    from unioncam.methods.kpca import KPCACAM

    model, layer, x = curved
    x = x[..., :12, :12]  # 144 positions: scikit-learn's dense eigensolver
    ours = unioncam.explain(model, x, "kpcacam", target_layer=layer, kernel=kernel)
    np.testing.assert_allclose(ours.maps.numpy(), kpca_reference(model, layer, x, kernel), atol=1e-5)
    assert all(float(m.max()) == 1.0 for m in ours.maps)
    eigen = unioncam.explain(model, x, "eigencam", target_layer=layer)
    if kernel != "linear":  # a linear kernel's PCA is Eigen-CAM (up to the sign convention)
        assert float((eigen.maps - ours.maps).abs().max()) > 0.05
    with pytest.raises(ValueError, match="kpcacam: unknown kernel 'tanh'"):
        KPCACAM(model, layer, kernel="tanh")  # type: ignore[arg-type]


def test_kpcacam_past_200_positions_equals_pytorch_grad_cams_arpack_solution(tiny64):
    model, layer, x = tiny64
    x = x[..., :32, :32]  # 16×16 = 256 positions: scikit-learn's ARPACK, started from a random vector
    ours = unioncam.explain(model, x, "kpcacam")
    np.testing.assert_allclose(ours.maps.numpy(), kpca_reference(model, layer, x, "sigmoid"), atol=1e-5)


@pytest.mark.parametrize("method", ["shapleycam", "finercam", "kpcacam"])
def test_lite0_photos_match_pytorch_grad_cam(lite0, method):
    loaded, layer, x = lite0
    ours = unioncam.explain(loaded, x, method)
    if method == "finercam":  # pytorch-grad-cam's FinerCAM explains the predicted classes itself
        theirs = pgc_maps(pgc.FinerCAM, loaded.model, [layer], x, None)
    else:
        cls = pgc.ShapleyCAM if method == "shapleycam" else pgc.KPCA_CAM
        theirs = pgc_maps(cls, loaded.model, [layer], x, logit_targets(ours.targets))
    for i in range(x.shape[0]):
        assert float((ours.maps[i] > 0.05).float().mean()) > 0.02  # not degenerate
        assert pearson(ours.maps[i].numpy(), theirs[i]) >= 0.999


# -- RefineCAM ------------------------------------------------------------------------------------------
def names_of(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    return [names[layer] for layer in layers]


def test_refinecam_equals_pytorch_grad_cam_on_the_stages_it_finds(tiny64):
    model, _, x = tiny64
    cam = get_method("refinecam")(model)
    ours = cam(x)
    assert names_of(model, cam.layers) == ["net.features.1", "net.features.4"]  # 64×64, then the target's 32×32
    theirs = pgc_maps(pgc.RefineCAM, model, list(cam.layers), x, logit_targets(ours.targets))
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-5)
    explicit = unioncam.explain(model, x, "refinecam", layers=["features.1", "features.4"])
    torch.testing.assert_close(explicit.maps, ours.maps, atol=0, rtol=0)
    gradcampp = unioncam.explain(model, x, "gradcampp")
    assert float((gradcampp.maps - ours.maps).abs().max()) > 0.1
    one = unioncam.explain(model, x, "refinecam", layers=[model.net.features[4]])  # one layer: Grad-CAM++
    theirs = pgc_maps(pgc.RefineCAM, model, [model.net.features[4]], x, logit_targets(ours.targets))
    np.testing.assert_allclose(one.maps.numpy(), theirs, atol=1e-5)
    with pytest.raises(ValueError, match=r"either target_layer .* or layers"):
        get_method("refinecam")(model, "features.4", layers=["features.1"])


def test_refinecam_default_layers_are_the_ends_of_the_earlier_stages():
    torchvision = pytest.importorskip("torchvision")
    from unioncam.methods.refine import stage_layers
    from unioncam.models import PixelModel

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    model = PixelModel(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "layer4").eval()
    probe = torch.rand(1, 3, 128, 128)
    assert names_of(model, stage_layers(model, probe, net.layer4, 3)) == ["net.layer2", "net.layer3", "net.layer4"]
    assert names_of(model, stage_layers(model, probe, net.layer4, 2)) == ["net.layer3", "net.layer4"]
    vgg = PixelModel(torchvision.models.vgg11(weights=None, num_classes=10), (0.5,) * 3, (0.25,) * 3).eval()
    found = stage_layers(vgg, probe, vgg.net.features[18], 3)  # the ReLUs before the pools
    assert names_of(vgg, found) == ["net.features.9", "net.features.14", "net.features.18"]
    hand = ref.hand_model()  # one resolution only: the target layer alone
    assert names_of(hand, stage_layers(hand, ref.hand_images(1), hand.net.act, 3)) == ["net.act"]
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    from unioncam.ops import nhwc_to_nchw

    swin = PixelModel(SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1),
                                      num_heads=(1, 2), num_classes=10), (0.5,) * 3, (0.25,) * 3).eval()
    target = swin.net.layers[1].blocks[0].norm1  # B×8×8×C: the first stage's output is B×16×16×C
    found = stage_layers(swin, torch.rand(1, 3, 64, 64), target, 3, nhwc_to_nchw)
    assert names_of(swin, found) == ["net.layers.0", "net.layers.1.blocks.0.norm1"]


def test_lite0_refinecam_matches_pytorch_grad_cam(lite0):
    loaded, _, x = lite0
    cam = get_method("refinecam")(loaded.model)
    ours = cam(x)
    assert names_of(loaded.model, cam.layers) == ["net.body._blocks.4", "net.body._blocks.10", "net.head_act"]
    theirs = pgc_maps(pgc.RefineCAM, loaded.model, list(cam.layers), x, logit_targets(ours.targets))
    for i in range(x.shape[0]):
        assert float((ours.maps[i] > 0.05).float().mean()) > 0.01  # not degenerate
        assert pearson(ours.maps[i].numpy(), theirs[i]) >= 0.999


# -- Group-CAM (the authors' code, as an independent loop) ---------------------------------------------------
def plain_blur(image: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """kornia's gaussian_blur2d (sampled Gaussian, reflect padding), with SciPy (``mirror`` = reflect)."""
    from scipy.ndimage import correlate1d

    size = min(kernel, 2 * min(image.shape[-2:]) - 1)
    x = np.arange(size) - size // 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    taps /= taps.sum()
    return correlate1d(correlate1d(image, taps, axis=-1, mode="mirror"), taps, axis=-2, mode="mirror")


def plain_groupcam(model: nn.Module, layer: nn.Module, image: torch.Tensor, c: int, groups: int = 32,
                   percentile: float = 70.0, kernel: int = 51, sigma: float = 50.0) -> tuple[np.ndarray, int]:
    """Group-CAM for one image, one group at a time, as the authors' ``cam/groupcam.py`` (NumPy where
    they use NumPy); returns the normalized map and the masked forwards it ran."""
    stored: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: stored.append(o))
    try:
        logits = model(image[None].clone().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, c], stored[0])
    acts, g = stored[0].detach()[0].numpy(), grad[0].numpy()
    weighted = g.mean(axis=(1, 2))[:, None, None] * acts
    h, w = image.shape[-2:]

    def prob(x: np.ndarray) -> float:
        with torch.no_grad():
            return float(model(torch.from_numpy(np.ascontiguousarray(x))[None]).softmax(-1)[0, c])

    blurred = plain_blur(image.numpy(), kernel, sigma)
    base = prob(blurred)
    total, forwards = np.zeros((h, w)), 0
    per_group = -(-weighted.shape[0] // groups)  # torch.chunk's ⌈K/G⌉
    for start in range(0, weighted.shape[0], per_group):
        m = np.maximum(weighted[start : start + per_group].sum(axis=0), 0)
        m = np.where(m > np.percentile(m, percentile), m, 0)
        up = F.interpolate(torch.from_numpy(m)[None, None], size=(h, w), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        if up.max() == up.min():
            continue
        up = (up - up.min()) / (up.max() - up.min())
        total += (prob(image.numpy() * up + blurred * (1 - up)) - base) * up
        forwards += 1
    return ref.norm(np.maximum(total, 0)), forwards


@pytest.mark.parametrize("groups", [32, 5])
def test_groupcam_equals_the_authors_algorithm_in_a_plain_loop(tiny64, groups):
    model, layer, x = tiny64  # 16 channels: 16 groups of one, or ⌈16/5⌉ = 4 per group (4 groups)
    ours = unioncam.explain(model, x, "groupcam", groups=groups, batch_size=7)
    for i, c in enumerate(ours.targets.tolist()):
        plain, forwards = plain_groupcam(model, layer, x[i], c, groups)
        assert plain.max() == 1.0
        np.testing.assert_allclose(ours.maps[i].numpy(), plain, atol=1e-5)
        assert int(ours.details["forwards"][i]) == forwards + 1  # + the blurred image
    one = unioncam.explain(model, x[1:2], "groupcam", groups=groups, batch_size=3)
    torch.testing.assert_close(one.maps[0], ours.maps[1], atol=1e-10, rtol=0)
    for other in ("scorecam", "gradcam"):
        assert float((unioncam.explain(model, x, other).maps - ours.maps).abs().max()) > 0.05


def test_groupcam_on_an_image_smaller_than_the_blur_kernel():
    model = ref.hand_model()  # 8×8 images: the 51-tap kernel is cut to 15 taps; 5 channels in 2 groups
    x = ref.hand_images(3)
    ours = unioncam.explain(model, x, "groupcam", groups=2, percentile=40)
    for i, c in enumerate(ours.targets.tolist()):
        plain, _ = plain_groupcam(model, model.net.act, x[i], c, groups=2, percentile=40)
        np.testing.assert_allclose(ours.maps[i].numpy(), plain, atol=1e-5)


def test_lite0_groupcam_runs_on_a_photo(lite0):
    loaded, _, x = lite0
    ours = unioncam.explain(loaded, x[:1], "groupcam", batch_size=16)
    assert ours.details["forwards"].tolist() == [33]  # 1280 channels: 32 groups of 40, none constant, + blur
    assert float((ours.maps[0] > 0.05).float().mean()) > 0.02


def test_forward_counts_for_progress(tiny64):
    """What the service's progress expects (``CAM.masked_forwards``) against the engine's counter."""
    from unioncam.engine import masked_inputs

    model, _, x = tiny64  # 16 channels at the target layer
    smooth = get_method("smoothgradcampp")(model, num_samples=3)
    before = masked_inputs()
    smooth(x)
    assert masked_inputs() - before == smooth.masked_forwards(3, 48, 48, 48) == 9
    group = get_method("groupcam")(model, groups=5, batch_size=4)  # ⌈16/5⌉ = 4 channels: 4 groups
    before = masked_inputs()
    done = group(x)
    assert masked_inputs() - before == int(done.details["forwards"].sum())  # the blurred images and the groups
    assert group.masked_forwards(3, 48, 48, 48) == 3 * (1 + 4) >= int(done.details["forwards"].sum())
    from unioncam.methods.group import group_count

    assert [group_count(k, 32) for k in (1280, 16, 100, 0)] == [32, 16, 25, 0]
