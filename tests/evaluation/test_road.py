"""ROAD (unioncam.evaluation.road) against pytorch-grad-cam 1.5.7's own implementation, image by image.

grad-cam's side is the reference: ``NoisyLinearImputer`` (a SciPy ``spsolve`` per image),
``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` (``np.percentile`` thresholds) and
``PerturbationConfidenceMetric``, run on the normalized tensor ``(x − mean) / std`` and the model's
un-normalized ``net``, as grad-cam users call it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import unioncam
import unioncam.evaluation.road as road_module
from unioncam.data.sample import sample_photo_paths
from unioncam.evaluation import confidence
from unioncam.evaluation.road import RoadResult, impute, percentile, road, road_combined, road_drop
from unioncam.methods import GradCAM
from unioncam.viz import load_image

# grad-cam's np.float32(list of tensors) warns under NumPy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
ORDERS = {"morf": RemoveMostRelevantFirst, "lerf": RemoveLeastRelevantFirst}


def photos(names: list[str], size: tuple[int, int]) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in sample_photo_paths(names).values()])


def gradcam_impute(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """grad-cam's noiseless imputation of one ``C×H×W`` image (its mask: 1 = kept)."""
    return NoisyLinearImputer(noise=0)(image, (~removed).float())


def gradcam_probs(model, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, order: str,
                  p: float) -> np.ndarray:
    """``f_c`` after grad-cam's ROAD perturbation at percentile ``p``, per image (noise 0)."""
    metric = PerturbationConfidenceMetric(ORDERS[order](p, NoisyLinearImputer(noise=0)))
    normalized = (x - model.mean) / model.std
    return metric(normalized, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(c)) for c in targets], model.net,
                  return_diff=False)


def random_masks(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Masks of every kind: random densities, blobs, border strips, one kept pixel, one removed."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    masks = [torch.rand(size, generator=g) < d for d in (0.05, 0.5, 0.95)]
    smooth = torch.nn.functional.interpolate(torch.rand(1, 1, 3, 3, generator=g), size=size, mode="bilinear")[0, 0]
    masks += [smooth > smooth.quantile(0.1), smooth < smooth.quantile(0.3)]  # large regions touching borders
    strip = torch.zeros(size, dtype=torch.bool)
    strip[:, : w // 3] = True
    strip[-2:] = True
    masks.append(strip)
    corner = torch.ones(size, dtype=torch.bool)
    corner[h - 1, w - 1] = False  # everything but one corner pixel
    masks.append(corner)
    single = torch.zeros(size, dtype=torch.bool)
    single[0, 0] = True
    masks.append(single)
    ring = torch.zeros(size, dtype=torch.bool)
    ring[[0, -1]] = True
    ring[:, [0, -1]] = True
    masks.append(ring)
    return torch.stack(masks[:n])


# -- percentile thresholds -----------------------------------------------------------------------


def test_percentile_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    for n in (4096, 37 * 53, 5):
        a = rng.random((6, n)).astype(np.float32)
        a[:2] = np.maximum(a[:2] - 0.3, 0) / 0.7  # many ties at 0, like ReLU maps
        a[2:4] = np.round(a[2:4] * 20) / 20  # many ties everywhere
        for v in (a, 1 - a):
            ps = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1, 33.3, 99.9, 0.001, 12.345]
            ours = percentile(torch.from_numpy(v), ps).numpy()
            ref = np.array([[np.percentile(row, p) for p in ps] for row in v])
            np.testing.assert_array_equal(ours, ref)
    doubles = rng.random((3, 1000))
    np.testing.assert_array_equal(percentile(torch.from_numpy(doubles), [10, 55.5]).numpy(),
                                  np.stack([np.percentile(doubles, p, axis=1) for p in (10, 55.5)], axis=1))


def test_road_masks_equal_gradcam_masks(monkeypatch):
    """The removal masks road() builds are exactly grad-cam's, ties included, at every percentile.
    ``torch.quantile`` (float32) as the threshold fails this: its ``k = q · (N − 1)`` in float32 moves
    the threshold past a map value for a few of these masks."""
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(5, 64, 64, generator=g)
    maps[3] = (maps[3] - 0.005).clamp_min(0)  # ties at the minimum (0.5%: every threshold is above it)
    maps[4] = torch.round(maps[4] * 64) / 64  # ties everywhere
    percentiles = tuple(range(1, 100))
    theirs = {}
    for order, cls in ORDERS.items():
        for p in percentiles:
            seen: list[torch.Tensor] = []
            for i in range(len(maps)):
                cls(p, lambda image, mask, seen=seen: seen.append(mask.bool().logical_not()) or image)(
                    torch.zeros(3, 64, 64), maps[i])
            theirs[order, p] = torch.stack(seen)
    captured = []

    def capture(images, removed, *args, **kwargs):
        captured.append(removed)
        return images

    monkeypatch.setattr(road_module, "impute", capture)
    model = unioncam.load("tiny_cnn").model
    road(model, torch.rand(5, 3, 64, 64, generator=g), maps, [0, 1, 2, 3, 4], percentiles, noise=0, batch_size=64)
    ours = torch.cat(captured).view(2, len(percentiles), len(maps), 64, 64)
    for o, order in enumerate(ORDERS):
        for k, p in enumerate(percentiles):
            assert torch.equal(ours[o, k], theirs[order, p]), (order, p)


# -- imputation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(13, 17), (20, 20), (8, 3)])
def test_impute_equals_gradcam_spsolve(size):
    masks = random_masks(9, size, seed=size[0])
    images = torch.rand(len(masks), 3, *size, generator=torch.Generator().manual_seed(2))
    ours = impute(images, masks)
    for i in range(len(masks)):
        torch.testing.assert_close(ours[i], gradcam_impute(images[i], masks[i]), atol=1e-5, rtol=0)
    assert torch.equal(ours[~masks[:, None].expand_as(images)], images[~masks[:, None].expand_as(images)])


def test_impute_equals_gradcam_on_a_photo():
    x = photos(["astronaut"], (64, 64))
    gray = x[0].mean(0)
    masks = torch.stack([gray >= percentile(gray.flatten()[None], [p])[0, 0] for p in (10, 50, 90)]
                        + [gray < percentile(gray.flatten()[None], [p])[0, 0] for p in (20, 80)])
    ours = impute(x.expand(len(masks), -1, -1, -1), masks)
    worst = max((ours[i] - gradcam_impute(x[0], masks[i])).abs().max().item() for i in range(len(masks)))
    assert worst < 1e-5


def test_impute_is_affine_equivariant_so_pixel_space_equals_normalized():
    """Imputing pixel values then normalizing equals imputing the normalized tensor (grad-cam's)."""
    x = photos(["chelsea", "coffee"], (40, 48))
    masks = random_masks(5, (40, 48), seed=3)[3:5]  # the two large regions
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close((impute(x, masks) - mean) / std, impute((x - mean) / std, masks), atol=1e-5, rtol=0)


def test_impute_noise_is_seeded_and_scaled_by_std_per_channel():
    size = (64, 64)
    masks = torch.rand(4, *size, generator=torch.Generator().manual_seed(4)) < 0.5
    images = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(5))
    std = (0.1, 0.5, 2.0)

    def noisy(seed: int, batch: slice = slice(None)) -> torch.Tensor:
        return impute(images[batch], masks[batch], 0.01, torch.Generator().manual_seed(seed), std=std)

    clean = impute(images, masks)
    a, b, other = noisy(0), noisy(0), noisy(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert torch.equal(a[~masks[:, None].expand_as(a)], images[~masks[:, None].expand_as(a)])  # kept pixels exact
    g = torch.Generator().manual_seed(0)  # a batch draws the same noise as its images one by one
    one_by_one = torch.cat([impute(images[i:i + 1], masks[i:i + 1], 0.01, g, std=std) for i in range(4)])
    assert torch.equal(a, one_by_one)
    diff = (a - clean).permute(1, 0, 2, 3)[:, masks]  # C × removed pixels
    assert diff.shape[1] > 7000
    for c, s in enumerate(std):
        assert diff[c].std().item() == pytest.approx(0.01 * s, rel=0.05)
        assert abs(diff[c].mean().item()) < 0.05 * 0.01 * s


def test_impute_errors():
    images = torch.rand(2, 3, 6, 7)
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[1] = True
    with pytest.raises(ValueError, match=r"every pixel is removed in image\(s\) \[1\]"):
        impute(images, masks)
    with pytest.raises(ValueError, match="B×H×W"):
        impute(images, masks[:, :5])
    with pytest.raises(ValueError, match="B×H×W"):
        impute(images[0], masks[0])
    with pytest.raises(ValueError, match="bool"):
        impute(images, masks.float())
    with pytest.raises(ValueError, match="noise"):
        impute(images, masks[[0, 0]], noise=-1)
    with pytest.raises(ValueError, match="one value per channel"):
        impute(images, masks[[0, 0]], std=(1.0, 2.0))
    hard = torch.ones(1, 64, 64, dtype=torch.bool)
    hard[0, 0, 0] = False
    with pytest.raises(RuntimeError, match="did not converge"):
        impute(torch.rand(1, 3, 64, 64), hard, max_iter=1)
    nothing = torch.zeros(2, 6, 7, dtype=torch.bool)
    assert torch.equal(impute(images, nothing), images)


# -- road() against grad-cam ---------------------------------------------------------------------


def test_road_equals_gradcam_on_tiny_cnn():
    loaded = unioncam.load("tiny_cnn")
    model = loaded.model
    x = photos(["chelsea", "coffee", "astronaut"], loaded.input_size)
    explanation = GradCAM(model)(x)
    maps, targets = explanation.maps, torch.tensor([3, 7, 0])
    percentiles = (10, 30, 50, 70, 90)
    result = road(model, x, maps, targets, percentiles, noise=0, batch_size=7)
    assert isinstance(result, RoadResult)
    assert result.morf.shape == result.lerf.shape == (3, len(percentiles))
    assert result.percentiles == percentiles and result.noise == 0 and result.seed == 0
    for order in ORDERS:
        theirs = np.stack([gradcam_probs(model, x, maps, targets, order, p) for p in percentiles], axis=1)
        np.testing.assert_allclose(getattr(result, order).numpy(), theirs, atol=1e-4, rtol=0)
    # the helpers against grad-cam's averages of the drops (return_diff=True) and its ROADCombined formula
    y, _ = confidence(model, x, maps, targets)
    averages = {}
    for order, cls in ORDERS.items():
        averager = AveragerAcrossThresholds(lambda p, cls=cls: PerturbationConfidenceMetric(
            cls(p, NoisyLinearImputer(noise=0))), list(percentiles))
        averages[order] = averager((x - model.mean) / model.std, maps.numpy(),
                                   [ClassifierOutputSoftmaxTarget(int(c)) for c in targets], model.net)
        np.testing.assert_allclose(road_drop(getattr(result, order), y).mean(1).numpy(), averages[order], atol=1e-4)
    np.testing.assert_allclose(road_combined(result).numpy(), (averages["lerf"] - averages["morf"]) / 2, atol=1e-4)


def test_road_equals_gradcam_on_efficientnet_with_a_real_map():
    loaded = unioncam.load("efficientnet_lite0")
    model = loaded.model
    x = photos(["chelsea", "astronaut"], loaded.input_size)
    explanation = GradCAM(model)(x)
    percentiles = (20, 50, 80)
    result = road(model, x, explanation.maps, explanation.targets, percentiles, noise=0)
    for order in ORDERS:
        theirs = np.stack([gradcam_probs(model, x, explanation.maps, explanation.targets, order, p)
                           for p in percentiles], axis=1)
        np.testing.assert_allclose(getattr(result, order).numpy(), theirs, atol=1e-4, rtol=0)
    assert (result.morf.mean() < result.lerf.mean()).item()  # removing the relevant pixels hurts more


def test_road_noise_is_seeded_and_independent_of_batch_size():
    model = unioncam.load("tiny_cnn").model
    g = torch.Generator().manual_seed(6)
    x, maps = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    targets = [1, 2, 3]
    a = road(model, x, maps, targets, (25, 75), noise=0.01, seed=5, batch_size=4)
    b = road(model, x, maps, targets, (25, 75), noise=0.01, seed=5, batch_size=5)
    c = road(model, x, maps, targets, (25, 75), noise=0.01, seed=6, batch_size=4)
    clean = road(model, x, maps, targets, (25, 75), noise=0, batch_size=4)
    assert a.seed == 5 and c.seed == 6
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    assert not torch.equal(a.morf, c.morf)
    assert not torch.equal(a.morf, clean.morf)
    torch.testing.assert_close(a.morf, clean.morf, atol=0.05, rtol=0)  # 0.01 normalized noise moves f_c a little


def test_road_errors():
    model = unioncam.load("tiny_cnn").model
    x, maps, targets = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16), [0, 1]
    with pytest.raises(ValueError, match="maps must be B×H×W"):
        road(model, x, maps[:, :8], targets)
    with pytest.raises(ValueError, match="maps must be B×H×W"):
        road(model, x, maps[:1], targets)
    with pytest.raises(ValueError, match="images must be B×C×H×W"):
        road(model, x[0], maps[0], targets[:1])
    with pytest.raises(ValueError, match="one class per image"):
        road(model, x, maps, [0, 1, 2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        road(model, x, torch.where(maps > 0.5, float("nan"), maps), targets)
    for bad in [(0,), (100,), (-5, 50), (50, 150), (), (float("nan"),)]:
        with pytest.raises(ValueError, match=r"percentiles must be non-empty and each in \(0, 100\)"):
            road(model, x, maps, targets, bad)
    # with image seeds the noise follows the image and the mask, not the batch: equal maps, equal values
    t = torch.as_tensor(targets)
    seeded = road(model, torch.cat([x, x[:1]]), torch.cat([maps, maps[:1]]), torch.cat([t, t[:1]]),
                  (10, 50), image_seeds=[5, 6, 5])
    torch.testing.assert_close(seeded.morf[0], seeded.morf[2], rtol=0, atol=0)
    alone_seeded = road(model, x[1:], maps[1:], targets[1:], (10, 50), image_seeds=[6])
    torch.testing.assert_close(seeded.lerf[1], alone_seeded.lerf[0], rtol=0, atol=0)
    assert not torch.equal(seeded.morf[0], road(model, x[:1], maps[:1], targets[:1], (10, 50),
                                                image_seeds=[7]).morf[0])
    # a threshold that removes every pixel leaves nothing to impute from: NaN there, the rest scored
    flat = road(model, x, torch.stack([maps[0], torch.full((16, 16), 0.3)]), targets, (10, 50), noise=0)
    assert torch.isnan(flat.morf[1]).all() and torch.isnan(flat.lerf[1]).all()
    alone = road(model, x[:1], maps[:1], targets[:1], (10, 50), noise=0)
    torch.testing.assert_close(flat.morf[0], alone.morf[0])
    torch.testing.assert_close(flat.lerf[0], alone.lerf[0])
    ties = maps.clone()
    ties[0][ties[0] < 0.3] = 0  # ~30% of the map at its minimum: MoRF 20 removes everything, 40 does not
    tied = road(model, x, ties, targets, (40, 20), noise=0)
    assert torch.isnan(tied.morf[0, 1]) and not torch.isnan(tied.morf[0, 0]) and not torch.isnan(tied.lerf).any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_road_on_cuda_equals_cpu():
    loaded = unioncam.load("tiny_cnn")
    x = photos(["chelsea", "coffee"], loaded.input_size)
    maps = GradCAM(loaded.model)(x).maps
    cpu = road(loaded.model, x, maps, [1, 2], (10, 50, 90), noise=0)
    model = loaded.model.to("cuda")
    gpu = road(model, x.cuda(), maps.cuda(), [1, 2], (10, 50, 90), noise=0)
    torch.testing.assert_close(gpu.morf.cpu(), cpu.morf, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.lerf.cpu(), cpu.lerf, atol=1e-5, rtol=0)
    masks = random_masks(9, (30, 41), seed=7)
    images = torch.rand(9, 3, 30, 41)
    torch.testing.assert_close(impute(images.cuda(), masks.cuda()).cpu(), impute(images, masks), atol=1e-6, rtol=0)
    noisy = road(model, x.cuda(), maps.cuda(), [1, 2], (10, 50, 90), seed=3)
    assert torch.equal(noisy.morf, road(model, x.cuda(), maps.cuda(), [1, 2], (10, 50, 90), seed=3).morf)
