"""Every method against independent float64 references, plus the cross-cutting contracts
(batching, hooks, gradients, constant-channel skipping) for every registered method."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from applicable import methods_for_tiny_cnn

import unioncam
from unioncam.methods import get_method
from unioncam.methods.union import amd, denoise_gradients, pixel_average_alpha
from unioncam.ops import clear_black_image_cache, normalize, upsample

GRADIENT_REFS = {"gradcam": ref.gradcam, "gradcampp": ref.gradcampp, "xgradcam": ref.xgradcam,
                 "layercam": ref.layercam}


@pytest.fixture(scope="module")
def hand():
    model = ref.hand_model()
    return model, ref.Reference(model), ref.hand_images(3)


@pytest.mark.parametrize("method", sorted(GRADIENT_REFS))
def test_gradient_methods_match_reference(hand, method):
    model, r, x = hand
    result = unioncam.explain(model, x, method)
    logits = model(x).detach()
    assert result.targets.tolist() == logits.argmax(1).tolist()
    acts = r.acts(x)
    for i, c in enumerate(result.targets.tolist()):
        expected = GRADIENT_REFS[method](acts[i], r.grads(c))
        np.testing.assert_allclose(result.maps[i].numpy(), expected, atol=1e-10)


def test_explicit_targets_are_explained(hand):
    model, r, x = hand
    targets = [5, 0, 2]
    result = unioncam.explain(model, x, "gradcam", targets=targets)
    assert result.targets.tolist() == targets
    acts = r.acts(x)
    for i, c in enumerate(targets):
        np.testing.assert_allclose(result.maps[i].numpy(), ref.gradcam(acts[i], r.grads(c)), atol=1e-10)


def test_scorecam_matches_reference(hand):
    model, r, x = hand
    result = unioncam.explain(model, x, "scorecam", batch_size=4)
    acts = r.acts(x)
    for i, c in enumerate(result.targets.tolist()):
        np.testing.assert_allclose(result.maps[i].numpy(), ref.scorecam(acts[i], x[i].numpy(), c, r.probs),
                                   atol=1e-10)


def test_unioncam_matches_equations_1_to_8(hand):
    model, r, x = hand
    result = unioncam.explain(model, x, "unioncam", batch_size=3)
    acts = r.acts(x)
    for i, c in enumerate(result.targets.tolist()):
        expected = ref.unioncam(acts[i], r.grads(c), x[i].numpy(), c, r.probs)
        np.testing.assert_allclose(result.maps[i].numpy(), expected["map"], atol=1e-10)
        for key in ("beta_den", "beta_reg", "beta_dereg"):
            assert float(result.details[key][i]) == pytest.approx(expected[key], abs=1e-12)
        assert result.details["selected"][i] == expected["selected"]
    # one masked forward per non-constant channel + 3 for the betas; channels 3 and 4 have zero
    # filters, and channel 0 happens to be all zero (ReLU) on image 2
    assert result.details["forwards"].tolist() == [3 + 3, 3 + 3, 2 + 3]


def test_unioncam_ablation_stages(hand):
    model, r, x = hand
    acts = r.acts(x)
    den = unioncam.explain(model, x, "unioncam", stage="amd")
    dereg = unioncam.explain(model, x, "unioncam", stage="amu")
    for i, c in enumerate(den.targets.tolist()):
        expected = ref.unioncam(acts[i], r.grads(c), x[i].numpy(), c, r.probs)
        np.testing.assert_allclose(den.maps[i].numpy(), expected["l_den"], atol=1e-10)
        np.testing.assert_allclose(dereg.maps[i].numpy(), expected["l_dereg"], atol=1e-10)
    assert torch.isnan(den.details["beta_den"]).all()
    assert torch.isnan(dereg.details["beta_dereg"]).all() and not torch.isnan(dereg.details["beta_reg"]).any()


def test_amd_functions_by_hand():
    # one channel, 1×5 positions: g = [-2, 1, 3, 0, 5]; 10th percentile (linear) = -2 + 0.4·3 = -0.8
    g = torch.tensor([[[[-2.0, 1.0, 3.0, 0.0, 5.0]]]], dtype=torch.float64)
    w = denoise_gradients(g, 10.0)
    assert w.flatten().tolist() == [0.0, 1.0, 3.0, 0.0, 5.0]
    alpha = pixel_average_alpha(w)
    assert alpha.flatten().tolist() == pytest.approx([0.0, 1 / 9, 1 / 9, 0.0, 1 / 9])
    a = torch.tensor([[[[1.0, 2.0, 1.0, 4.0, 0.5]]]], dtype=torch.float64)
    # cam = α·ReLU(W)·A = [0, 2/9, 3/9, 0, 2.5/9] → normalized by max 3/9
    assert amd(a, g, (1, 5)).flatten().tolist() == pytest.approx([0.0, 2 / 3, 1.0, 0.0, 2.5 / 3])


def test_upsample_and_normalize_by_hand():
    up = upsample(torch.tensor([[[0.0, 1.0]]]), (1, 4))  # align_corners=False: [0, .25, .75, 1]
    assert up.flatten().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    m = normalize(torch.tensor([[[2.0, 4.0], [3.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]]))
    assert m[0].flatten().tolist() == pytest.approx([0.0, 0.5, 0.25, 1.0])
    assert m[1].abs().sum() == 0 and not torch.isnan(m).any()


@pytest.fixture(scope="module")
def tiny():
    return unioncam.load("tiny_cnn")


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_batch_equals_single(tiny, method):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = unioncam.explain(tiny, x, method, batch_size=5)
    for i in range(4):
        one = unioncam.explain(tiny, x[i : i + 1], method, batch_size=2)
        assert one.targets.item() == batch.targets[i].item()
        torch.testing.assert_close(one.maps[0], batch.maps[i], atol=1e-5, rtol=0)
    assert batch.maps.shape == (4, 32, 32)
    assert float(batch.maps.min()) >= 0.0 and float(batch.maps.max()) <= 1.0


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_no_hook_survives_an_exception(hand, method):
    model, _, _ = hand
    bad = ref.hand_images(1)[:, :, :7, :7]  # conv runs (hook fires), then the linear layer fails
    with pytest.raises(RuntimeError):
        unioncam.explain(model, bad, method)
    assert _hooks(model) == 0
    assert not model.training
    with get_method(method)(model) as cam:
        cam(ref.hand_images(1))
        assert _hooks(model) == 0 and len(cam.layers) == 1  # hooks exist only during a call
        with pytest.raises(ValueError, match="targets must lie"):
            cam(ref.hand_images(1), targets=[99])
    assert _hooks(model) == 0


@pytest.mark.parametrize("method", methods_for_tiny_cnn())  # transformer-only ones: test_legrad.py
def test_parameters_get_no_grad_and_training_mode_restored(method):
    model = ref.hand_model()
    model.requires_grad_(True)
    model.train()
    unioncam.explain(model, ref.hand_images(2), method)
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_skipping_constant_channels_changes_nothing_and_saves_passes(hand):
    model, r, x = hand
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        clear_black_image_cache()
        fast = unioncam.explain(model, x, "scorecam", batch_size=4)
        fast_images = sum(seen)
        seen.clear()
        slow = unioncam.explain(model, x, "scorecam", batch_size=4, skip_constant=False)
        slow_images = sum(seen)
    finally:
        handle.remove()
    torch.testing.assert_close(fast.maps, slow.maps, atol=1e-12, rtol=0)
    acts = r.acts(x)
    non_constant = int(sum((a.max(axis=(1, 2)) > a.min(axis=(1, 2))).sum() for a in acts))
    assert non_constant == 8  # 3 channels with non-zero filters, one of them dead on image 2
    # explaining forward (3 images) + black image (once, cached) + one input per non-constant pair
    assert fast_images == 3 + 1 + non_constant
    assert slow_images == 3 + 3 * ref.K  # black image now cached
    assert fast.details["forwards"].tolist() == [3, 3, 2]


def test_bad_input_errors(hand):
    model, _, x = hand
    with pytest.raises(ValueError, match="B×3×H×W"):
        unioncam.explain(model, x[0], "gradcam")
    with pytest.raises(ValueError, match="floating point"):
        unioncam.explain(model, (x * 255).to(torch.uint8), "gradcam")
    with pytest.raises(ValueError, match="got 2 targets for 3 images"):
        unioncam.explain(model, x, "gradcam", targets=[1, 2])
    with pytest.raises(ValueError, match="no layer 'nope'"):
        unioncam.explain(model, x, "gradcam", target_layer="nope")
    with pytest.raises(ValueError, match="valid: gradcam"):
        unioncam.explain(model, x, "gradcamm")
    with pytest.raises(ValueError, match="precision"):
        unioncam.explain(model, x, "scorecam", precision="fp8")
    with pytest.raises(ValueError, match="stage"):
        unioncam.explain(model, x, "unioncam", stage="all")


def test_target_layer_as_module_or_name(hand):
    model, _, x = hand
    by_name = unioncam.explain(model, x, "layercam", target_layer="act")
    by_module = unioncam.explain(model, x, "layercam", target_layer=model.net.act)
    torch.testing.assert_close(by_name.maps, by_module.maps)
