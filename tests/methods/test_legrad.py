"""LeGrad (issue 26): equal to TorchCAM 0.5.0's ``LeGrad`` on torchvision's VisionTransformer, equal to a
plain loop written from the definition on a timm ViT with register tokens, one-line refusals, and the
registry-wide properties (hooks only during a call, training flags, no parameter gradients, batches) for
the methods that explain transformers only, on a tiny ViT."""

from __future__ import annotations

import pytest
import torch
from applicable import tiny_vit, transformer_only
from torch import nn

import unioncam
from unioncam.methods import get_method
from unioncam.ops import normalize, upsample

torchcam = pytest.importorskip("torchcam")
timm = pytest.importorskip("timm")


def images(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def vit64():
    return tiny_vit(torch.float64)


def torchcam_legrad(lm, x: torch.Tensor, classes: list[int], blocks: int) -> torch.Tensor:
    """TorchCAM's LeGrad maps on the wrapped torchvision ViT, upsampled and normalized as ours are."""
    from torchcam.methods import LeGrad

    net = lm.model.net
    names = [f"encoder.layers.encoder_layer_{i}" for i in range(3 - blocks, 3)]
    with LeGrad(net, names) as cam:
        scores = net((x - lm.model.mean) / lm.model.std)
        low = cam(classes, scores)[0]
    return normalize(upsample(low.detach(), tuple(x.shape[-2:])))


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_legrad_equals_torchcam_on_torchvisions_vision_transformer(vit64, blocks):
    x = images(3, seed=1, dtype=torch.float64)
    ours = unioncam.explain(vit64, x, "legrad", blocks=blocks)
    theirs = torchcam_legrad(vit64, x, ours.targets.tolist(), blocks)
    torch.testing.assert_close(ours.maps, theirs, atol=1e-10, rtol=0)
    assert all(float(m.max() - m.min()) > 0.99 for m in ours.maps)  # not constant maps
    chosen = unioncam.explain(vit64, x, "legrad", targets=[3, 4, 5], blocks=blocks)
    torch.testing.assert_close(chosen.maps, torchcam_legrad(vit64, x, [3, 4, 5], blocks), atol=1e-10, rtol=0)
    assert float((chosen.maps - ours.maps).abs().max()) > 1e-3  # the class matters
    if blocks > 1:
        one = unioncam.explain(vit64, x, "legrad", blocks=1)
        assert float((one.maps - ours.maps).abs().max()) > 1e-3  # so does the number of blocks


def plain_legrad(net: nn.Module, x: torch.Tensor, classes: torch.Tensor, blocks: list[nn.Module],
                 prefix: int) -> torch.Tensor:
    """The definition on a timm ViT in its unfused path: each block's post-softmax attention (the input of its
    ``attn_drop``) is made a leaf, the block's class score is ``head(fc_norm(norm(mean of its tokens)))``,
    and each block's gradient is taken on its own (one backward per block)."""
    leaves: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    handles = []
    for block in blocks:
        block.attn.fused_attn = False

        def leaf(_m, _i, out):
            leaves.append(out.detach().requires_grad_(True))
            return leaves[-1]

        handles.append(block.attn.attn_drop.register_forward_hook(leaf))
        handles.append(block.register_forward_hook(lambda _m, _i, out: tokens.append(out)))
    try:
        with torch.enable_grad():
            net(x)
            maps = []
            for a, z in zip(leaves, tokens, strict=True):
                score = net.head(net.fc_norm(net.norm(z.mean(dim=1))))
                grad, = torch.autograd.grad(score.gather(1, classes[:, None]).sum(), a, retain_graph=True)
                relevance = grad.clamp_min(0).mean(dim=(1, 2))[:, prefix:]
                side = int(relevance.shape[-1] ** 0.5)
                maps.append(relevance.reshape(-1, side, side))
    finally:
        for h in handles:
            h.remove()
        for block in blocks:
            block.attn.fused_attn = True
    return normalize(upsample(torch.stack(maps).mean(dim=0), tuple(x.shape[-2:])))


def test_legrad_on_a_timm_vit_with_register_tokens_equals_the_definition():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=7,
                            reg_tokens=2, global_pool="avg").eval()
    assert net.num_prefix_tokens == 3 and isinstance(net.fc_norm, nn.LayerNorm)  # the pooled path's norm
    lm = unioncam.load(net, target_layer="blocks.3.norm1", input_size=32)
    lm.model.double()
    x = images(3, seed=2, dtype=torch.float64)
    ours = unioncam.explain(lm, x, "legrad", blocks=3)
    mean, std = lm.model.mean, lm.model.std
    theirs = plain_legrad(net, (x - mean) / std, ours.targets, list(net.blocks[1:4]), prefix=3)
    torch.testing.assert_close(ours.maps, theirs, atol=1e-10, rtol=0)
    # the target layer picks the last block: blocks 0..2 when it is in block 2
    earlier = unioncam.explain(lm, x, "legrad", target_layer="blocks.2.mlp", blocks=3)
    torch.testing.assert_close(earlier.maps, plain_legrad(net, (x - mean) / std, earlier.targets,
                                                          list(net.blocks[0:3]), prefix=3), atol=1e-10, rtol=0)


def test_legrad_refuses_what_it_cannot_explain_in_one_line(vit64):
    cnn = unioncam.load("tiny_cnn")
    with pytest.raises(ValueError, match=r"^legrad: model TinyCNN has no transformer block with self-attention at "
                                         r"its target layer features\.4 \(LeGrad explains vision transformers"):
        get_method("legrad").check_model(cnn.model, cnn.target_layer, cnn.input_size)
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                           num_classes=7)
    with pytest.raises(ValueError, match=r"^legrad: model SwinTransformer has no transformer block with "
                                         r"self-attention"):  # window attention: not LeGrad's
        get_method("legrad").check_model(unioncam.load(swin, target_layer="layers.1.blocks.0.norm1",
                                                       input_size=32).model, "layers.1.blocks.0.norm1")
    with pytest.raises(ValueError, match=r"legrad: blocks=4, but model VisionTransformer has 3 transformer block"):
        get_method("legrad")(vit64.model, blocks=4)
    with pytest.raises(ValueError, match=r"legrad: blocks must be an integer >= 1, got 0"):
        get_method("legrad")(vit64.model, blocks=0)
    headless = nn.Sequential()
    headless.add_module("encoder", vit64.model.net.encoder)
    with pytest.raises(ValueError, match=r"legrad: model Sequential has no head LeGrad knows"):
        get_method("legrad").check_model(headless, "encoder.layers.encoder_layer_2.ln_1")
    get_method("legrad").check_model(vit64.model)  # the ViT: accepted


# -- the registry-wide properties, for the methods tiny_cnn cannot carry ----------------------------------
def model_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.mark.parametrize("method", transformer_only())
def test_hooks_exist_only_during_the_call_and_not_after_an_exception(vit, method):
    model = vit.model
    cam = get_method(method)(model)
    assert model_hooks(model) == 0
    seen: list[int] = []
    probe = model.net.heads.register_forward_pre_hook(lambda m, i: seen.append(model_hooks(model) - 1))
    try:
        cam(images(2))
    finally:
        probe.remove()
    assert seen and seen[0] > 0 and model_hooks(model) == 0  # hooked during the explaining forward only
    boom = model.net.heads.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cam(images(1))
    finally:
        boom.remove()
    assert model_hooks(model) == 0
    with pytest.raises(ValueError, match="targets must lie"):
        cam(images(1), targets=[99])
    assert model_hooks(model) == 0 and cam(images(1)).maps.shape == (1, 32, 32)  # still usable


@pytest.mark.parametrize("method", transformer_only())
def test_training_flags_restored_and_parameters_get_no_gradient(vit, method):
    model = vit.model
    model.requires_grad_(True)
    model.train()
    model.net.encoder.layers[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    modes: list[bool] = []
    probe = model.net.register_forward_pre_hook(lambda m, i: modes.append(any(x.training for x in model.modules())))
    try:
        unioncam.explain(model, images(2), method)
    finally:
        probe.remove()
    assert modes and not any(modes)  # every forward of the call ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", transformer_only())
def test_a_batch_equals_its_images_one_by_one(vit, method):
    x = images(4, seed=3)
    batch = unioncam.explain(vit, x, method)
    for i in range(4):
        one = unioncam.explain(vit, x[i : i + 1], method)
        assert one.targets.item() == batch.targets[i].item()
        torch.testing.assert_close(one.maps[0], batch.maps[i], atol=1e-5, rtol=0)
    assert batch.maps.shape == (4, 32, 32) and float(batch.maps.min()) >= 0 and float(batch.maps.max()) <= 1


def test_a_distilled_deits_block_scores_average_its_two_heads():
    """A distilled DeiT's eval-mode logits average ``head`` and ``head_dist``: so do LeGrad's block scores
    (zeroing ``head_dist`` changes the map; with equal heads it is the one-head map)."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    net = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3,
                                     num_classes=7).eval()
    lm = unioncam.load(net, target_layer="blocks.1.norm1", input_size=32)
    lm.model.double()
    x = images(2, seed=4, dtype=torch.float64)
    both = unioncam.explain(lm, x, "legrad", targets=[1, 2])
    with torch.no_grad():
        net.head_dist.weight.copy_(net.head.weight)
        net.head_dist.bias.copy_(net.head.bias)
    same = unioncam.explain(lm, x, "legrad", targets=[1, 2])
    single = unioncam.explain(lm, x, "legrad", targets=[1, 2],
                              score_projection=lambda t: net.head(net.fc_norm(net.norm(t.mean(dim=1)))))
    torch.testing.assert_close(same.maps, single.maps, atol=1e-10, rtol=0)
    assert float((both.maps - same.maps).abs().max()) > 1e-3
