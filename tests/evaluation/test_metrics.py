"""Metrics against hand-computed cases and an independent NumPy/SciPy reference; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from torch import nn

from unioncam.evaluation import (
    average_drop,
    average_increase,
    confidence,
    energy_pointing_game,
    gaussian_blur,
    insertion_deletion,
    summarize,
)


class MeanModel(nn.Module):
    """``f_0(x) = mean(x)``: logits ``[log m, log(1 − m)]``, so softmax class 0 is the mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3)).clamp(1e-9, 1 - 1e-9)
        return torch.stack([m.log(), (1 - m).log()], dim=1)


def test_confidence_by_hand():
    model = MeanModel()
    x = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    x[1] = 0.8
    maps = torch.zeros(2, 4, 4, dtype=torch.float64)
    maps[0, :, :2] = 1.0  # half the pixels kept → mean 0.25
    maps[1] = 0.5  # every pixel halved → mean 0.4
    y, o = confidence(model, x, maps, torch.tensor([0, 0]), batch_size=3)
    assert y.tolist() == pytest.approx([0.5, 0.8], abs=1e-9)
    assert o.tolist() == pytest.approx([0.25, 0.4], abs=1e-9)


def test_map_of_ones_gives_o_equal_y():
    model = ref.hand_model()
    x = ref.hand_images(3)
    targets = torch.tensor([0, 3, 5])
    y, o = confidence(model, x, torch.ones(3, 8, 8, dtype=torch.float64), targets, batch_size=2)
    torch.testing.assert_close(o, y, atol=1e-12, rtol=0)
    expected = torch.softmax(model(x), -1).gather(1, targets[:, None])[:, 0].detach()
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_average_drop_and_increase_by_hand():
    y = torch.tensor([0.5, 0.8, 0.2, 0.4])
    o = torch.tensor([0.25, 0.9, 0.2, 0.1])
    assert average_drop(y, o).tolist() == pytest.approx([50.0, 0.0, 0.0, 75.0])
    assert average_increase(y, o).tolist() == [0.0, 100.0, 0.0, 0.0]
    assert float(average_drop(y, o).mean()) == pytest.approx(31.25)


@pytest.mark.parametrize(("y", "o", "message"), [
    ([0.0, 0.5], [0.1, 0.2], "Y must be > 0"),
    ([float("nan"), 0.5], [0.1, 0.2], "NaN"),
    ([0.3, 0.5], [0.1], "differ in shape"),
])
def test_drop_and_increase_reject_bad_input(y, o, message):
    for fn in (average_drop, average_increase):
        with pytest.raises(ValueError, match=message):
            fn(torch.tensor(y), torch.tensor(o))


def test_confidence_rejects_bad_maps():
    model, x = MeanModel(), torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="B×H×W"):
        confidence(model, x, torch.ones(2, 5, 4), torch.tensor([0, 0]))
    bad = torch.ones(2, 4, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        confidence(model, x, bad, torch.tensor([0, 0]))


def test_deletion_by_hand():
    """Left half white, right half black; f_0 = mean. Deleting the white half first drops the
    score linearly from 0.5 to 0 over the first half of the steps: AUC = 0.125. Deleting the
    black half first keeps 0.5 for half the steps, then drops: AUC = 0.25 + 0.125 = 0.375."""
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    x[:, :, :, :4] = 1.0
    maps = torch.zeros(2, 8, 8, dtype=torch.float64)
    maps[0, :, :4] = 1.0
    maps[1, :, 4:] = 1.0
    _, deletion = insertion_deletion(MeanModel(), x, maps, torch.tensor([0, 0]), steps=16, batch_size=7)
    assert deletion.tolist() == pytest.approx([0.125, 0.375], abs=1e-9)


def test_insertion_against_independent_reference():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 12, 12, generator=gen, dtype=torch.float64)
    cam = torch.rand(1, 12, 12, generator=gen, dtype=torch.float64)
    steps = 9
    insertion, _ = insertion_deletion(MeanModel(), x, cam, torch.tensor([0]), steps=steps, batch_size=4)
    img = x[0].numpy()
    # torch's "reflect" padding is SciPy's "mirror"; radius = truncate·σ = 5
    blurred = np.stack([scipy_ndimage.gaussian_filter(c, sigma=5.0, mode="mirror", truncate=1.0) for c in img])
    torch.testing.assert_close(gaussian_blur(x)[0], torch.from_numpy(blurred), atol=1e-12, rtol=0)
    order = np.argsort(-cam[0].numpy().ravel(), kind="stable")
    curve = []
    for s in range(steps + 1):
        shown = np.zeros(144, dtype=bool)
        shown[order[: round(s * 144 / steps)]] = True
        curve.append(np.where(shown.reshape(12, 12), img, blurred).mean())
    expected = np.trapezoid(curve, dx=1 / steps)
    assert float(insertion[0]) == pytest.approx(expected, abs=1e-9)


def test_energy_pointing_game_by_hand():
    uniform = torch.ones(1, 8, 10)
    assert energy_pointing_game(uniform, [[[2, 1, 6, 5]]]).tolist() == pytest.approx([16 / 80])
    # two overlapping boxes: union = 16 + 16 − 4 = 28 pixels
    assert energy_pointing_game(uniform, [[[2, 1, 6, 5], [4, 3, 8, 7]]]).tolist() == pytest.approx([28 / 80])
    # fractional box [0.4, 0, 1.6, 1] holds the centres of pixels (0, 0) and (1, 0)
    assert energy_pointing_game(uniform, [[[0.4, 0, 1.6, 1]]]).tolist() == pytest.approx([2 / 80])
    peaked = torch.zeros(2, 8, 10)
    peaked[0, 2, 3] = 3.0
    peaked[0, 7, 9] = 1.0
    values = energy_pointing_game(peaked, [[[3, 2, 4, 3]], [[0, 0, 10, 8]]])
    assert values.tolist() == pytest.approx([0.75, 0.0])  # all-zero map: documented 0


@pytest.mark.parametrize(("boxes", "message"), [
    ([[]], "at least one box"),
    ([[[3, 2, 3, 5]]], "empty box"),
    ([[[1, 2, 3]]], "xmin, ymin, xmax, ymax"),
    ([[[1, 2, 3, 4]], [[1, 2, 3, 4]]], "one box list per map"),
])
def test_energy_pointing_game_rejects_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        energy_pointing_game(torch.ones(1, 8, 10), boxes)


def test_summarize_mean_ci_and_classes():
    values = np.array([0.0] * 1400 + [100.0] * 600)
    classes = ["cat"] * 1000 + ["dog"] * 1000
    rows = {s.group: s for s in summarize(values, classes, seed=1)}
    overall = rows["all"]
    assert overall.n == 2000 and overall.mean == pytest.approx(30.0)
    half = 1.96 * 100 * np.sqrt(0.3 * 0.7 / 2000)  # normal approximation, ≈ 2.0 points
    assert overall.ci_low == pytest.approx(30.0 - half, abs=0.35)
    assert overall.ci_high == pytest.approx(30.0 + half, abs=0.35)
    assert rows["cat"].mean == pytest.approx(0.0) and rows["cat"].ci_low == rows["cat"].ci_high == 0.0
    assert rows["dog"].mean == pytest.approx(60.0) and rows["dog"].n == 1000
    assert summarize(values, classes, seed=1) == summarize(values, classes, seed=1)
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        summarize([])


def test_bootstrap_in_chunks_equals_one_draw_and_stays_small(monkeypatch):
    import tracemalloc

    from unioncam.evaluation import summary as metrics

    values = np.random.default_rng(1).random(3001)
    rng = np.random.default_rng(7)  # the unchunked definition, written out
    means = values[rng.integers(0, len(values), size=(1000, len(values)))].mean(axis=1)
    expected = tuple(np.quantile(means, [(1 - 0.95) / 2, (1 + 0.95) / 2]))
    monkeypatch.setattr(metrics, "BOOT_CHUNK", 3001 * 7)  # 7 resamples per chunk, the last one partial
    assert metrics.bootstrap_ci(values, seed=7) == pytest.approx(expected, abs=0)
    monkeypatch.undo()
    big = np.random.default_rng(2).random(50_000)
    tracemalloc.start()
    lo, hi = metrics.bootstrap_ci(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert lo < big.mean() < hi and peak < 80e6  # one n_boot×N draw would be 400 MB
