"""The speed options give the plain path's maps: channels_last weights, torch.compile, bf16."""

from __future__ import annotations

import pytest
import torch

from unioncam import METHODS, explain, load


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 64, 64, generator=g)


@pytest.mark.parametrize("method", METHODS.names())
def test_channels_last_gives_the_plain_maps(images, method):
    plain, fast = load("tiny_cnn"), load("tiny_cnn", channels_last=True)
    assert fast.model.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = explain(plain, images, method), explain(fast, images, method)
    assert torch.equal(a.targets, b.targets)
    torch.testing.assert_close(b.maps, a.maps, atol=1e-5, rtol=0)


def test_compiled_forward_passes_give_the_plain_maps(images):
    plain, fast = load("tiny_cnn"), load("tiny_cnn", channels_last=True, compile=True)
    assert fast.model._compiled is not None
    for method in ("unioncam", "scorecam", "gradcam"):
        a, b = explain(plain, images, method), explain(fast, images, method)
        torch.testing.assert_close(b.maps, a.maps, atol=1e-5, rtol=0)
    with torch.enable_grad():  # the explaining forward (grad on) never goes through the compiled graph
        x = images.clone().requires_grad_(True)
        fast.model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_masked_forwards_stay_close_on_cpu(images):
    lm = load("tiny_cnn")
    a = explain(lm, images, "scorecam")
    b = explain(lm, images, "scorecam", precision="bf16")
    assert torch.equal(a.targets, b.targets)
    assert (a.maps - b.maps).abs().max() < 0.1  # bf16 keeps 8 bits of mantissa: close, not equal
    assert not torch.equal(a.maps, b.maps)  # and it did run in bf16
