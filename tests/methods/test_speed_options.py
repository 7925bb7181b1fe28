"""The speed options give the plain path's maps: channels_last weights, torch.compile, bf16/fp16; and
"fp32" is IEEE fp32 (TF32 off) in every pass."""

from __future__ import annotations

import pytest
import torch
from applicable import methods_for_tiny_cnn

from unioncam import explain, load


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 64, 64, generator=g)


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
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


def _score_weights(images, precision):
    from unioncam.methods.base import find_layer
    from unioncam.methods.score import score_weights

    lm = load("tiny_cnn")
    acts = {}
    handle = find_layer(lm.model, None).register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))
    with torch.no_grad():
        targets = lm.model(images).argmax(1)
    handle.remove()
    return score_weights(lm.model, images, targets, acts["a"], batch_size=4, precision=precision)


def test_bf16_masked_forwards_stay_close_on_cpu(images):
    """bf16 runs the masked forwards (Score-CAM weights move a little) and stays within bf16's error."""
    w32, n32 = _score_weights(images, "fp32")
    w16, n16 = _score_weights(images, "bf16")
    assert torch.equal(n32, n16) and n32.sum() > 0
    assert not torch.equal(w32, w16)  # it did run in bf16
    # weights up to 1.5e-3 here (differences of probabilities near 0.1, bf16 ε = 2⁻⁸): measured 2.0e-4 off
    torch.testing.assert_close(w16, w32, atol=5e-4, rtol=0)


def test_fp16_on_cpu_warns_and_rounds_finer_than_bf16(images):
    """fp16 on a CPU is allowed (to preview a GPU's fp16), warns that it is slow, and moves the
    Score-CAM weights less than bf16 does (10 mantissa bits against 7)."""
    import unioncam.ops

    unioncam.ops._warned_cpu_fp16 = False
    with pytest.warns(RuntimeWarning, match="slow"):
        w16, _ = _score_weights(images, "fp16")
    w32, _ = _score_weights(images, "fp32")
    wb, _ = _score_weights(images, "bf16")
    assert not torch.equal(w16, w32)  # it did run in fp16
    assert (w16 - w32).abs().max() < (wb - w32).abs().max() / 2
    torch.testing.assert_close(w16, w32, atol=1e-4, rtol=0)  # fp16 ε = 2⁻¹¹: measured 3.0e-5 off


def test_fp32_means_ieee_fp32_in_every_pass(images):
    """TF32 (PyTorch's CUDA default for fp32 convs) is off in the explaining forward and backward,
    in the masked forwards and in the metrics' forwards, and the caller's flags come back after."""
    from unioncam.evaluation import confidence

    lm = load("tiny_cnn")
    seen: list[tuple[bool, bool]] = []
    lm.model.net.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        for precision in ("fp32", "bf16"):
            res = explain(lm, images, "unioncam", precision=precision)
        confidence(lm.model, images, res.maps, res.targets)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert len(seen) > 10 and set(seen) == {(False, False)}


def test_logits_stay_fp32_under_autocast():
    """The last Linear computes in fp32 under bf16 autocast (full-precision logits), and keeps its
    parameter names, so state dicts still load."""
    from unioncam.models import FP32Linear, TinyCNN

    lm = load("tiny_cnn")
    heads = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert type(heads[-1]) is FP32Linear
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm.model(x)
        body = lm.model.net.features(x)
    assert out.dtype == torch.float32 and body.dtype == torch.bfloat16
    assert [f"net.{k}" for k in TinyCNN().state_dict()] == [k for k in lm.model.state_dict() if k.startswith("net.")]


def test_unioncam_betas_run_in_fp32_under_bf16():
    """Under bf16 only L_Region's channel forwards are reduced: β_Den (whose map, L_Den, comes from
    gradients and does not depend on the precision) is the fp32 value exactly."""
    from unioncam.data.sample import sample_photo_paths
    from unioncam.viz import load_image

    lm = load("tiny_cnn")
    x = torch.stack([load_image(p, (64, 64)) for p in sample_photo_paths(["chelsea", "coffee", "astronaut"]).values()])
    a = explain(lm, x, "unioncam")
    b = explain(lm, x, "unioncam", precision="bf16")
    assert (a.details["beta_den"].abs() > 1e-6).any()
    torch.testing.assert_close(b.details["beta_den"], a.details["beta_den"], rtol=0, atol=1e-7)
    assert not torch.equal(b.details["beta_reg"], a.details["beta_reg"])  # L_Region did change in bf16
