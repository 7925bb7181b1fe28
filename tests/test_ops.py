"""The numeric helpers (unioncam.ops) and the CAM formulas built on them: bit-identical to the
idioms they replace, finite where those give NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unioncam.evaluation as metrics
from unioncam.methods.gradient import gradcampp_alpha, xgradcam_weights
from unioncam.methods.integrative import generalized_alpha
from unioncam.methods.union import pixel_average_alpha
from unioncam.ops import is_constant, is_zero, normalize, safe_divide

REPO = Path(__file__).resolve().parents[1]
KIT_FOX = "n02119789"  # torchvision 278



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


def test_is_zero_and_is_constant_tell_dead_from_constant_channels():
    maps = torch.zeros(2, 3, 2, 2)
    maps[0, 1] = 2.0  # constant, not zero
    maps[0, 2, 1, 0] = -0.5  # varies
    maps[1, 0, 0, 1] = 1e-30  # tiny but not zero
    assert is_zero(maps).tolist() == [[True, False, False], [False, True, True]]
    assert is_constant(maps).tolist() == [[True, True, False], [False, True, True]]
