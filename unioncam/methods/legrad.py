"""LeGrad ("LeGrad: An Explainability Method for Vision Transformers via Feature Formation
Sensitivity", Bousselham et al., arXiv:2404.03214), as TorchCAM 0.5.0's ``LeGrad`` computes it.

For each of the last ``L`` transformer blocks ``l``, with ``z^l`` the block's output tokens
(``B×N×C``) and ``A^l`` its post-softmax attention (``B×heads×N×N``):

* the block's class score is the model's head applied to its mean token,
  ``s^l = head(norm(mean_n z^l_n))`` (``norm``: the final norm(s) the model applies before its head);
* its relevance is the positive gradient averaged over heads and queries,
  ``r^l = mean_{h,q} ReLU(∂s^l_c/∂A^l_hq)``, a vector over keys; the prefix keys (class and
  distillation tokens) are dropped and the patch keys laid out on their ``√n×√n`` grid;
* the map is ``mean_l r^l``, upsampled and min-max normalized (TorchCAM normalizes before the caller
  upsamples; the normalized result is the same). No attention value multiplies the gradient.

One forward and one backward for all the blocks together: every block's input is detached in the
explaining forward (the values are unchanged), so ``∂(Σ_l s^l)/∂A^l = ∂s^l/∂A^l`` (TorchCAM runs one
backward per block). ``A^l`` is recomputed from the block's own query and key projections in a
forward hook on its attention module, which then returns the attention output replayed from that
``A^l`` (checked against the module's own output, so a variant we do not know is refused rather than
explained wrongly).

Supported: blocks whose attention is :class:`torch.nn.MultiheadAttention` (batch-first self-attention,
torchvision's ``VisionTransformer``, the model TorchCAM's LeGrad supports) or timm's ``Attention``
(timm ``vit_*``, ``deit_*``). The head: torchvision ViT ``heads(encoder.ln(·))``, timm ViT
``head(fc_norm(norm(·)))`` (a distilled DeiT: the mean of ``head`` and ``head_dist``, as its eval-mode
logits), or ``score_projection=`` (tokens ``B×N×C`` → logits ``B×classes``).

Decisions:

* Blocks (TorchCAM has no default; it takes a list): the ``blocks`` blocks (default 2, the default
  of the authors' public wrapper, which starts two blocks from the end) ending at the block that
  holds the target layer (the model's default target layer is in the last block).
* Prefix tokens: timm's ``num_prefix_tokens``, else the model's token reshape's
  (:func:`unioncam.ops.vit_reshape`), else 1 (torchvision's class token); ``prefix_tokens=`` sets it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details, Explanation, Targets, find_layer, model_name
from unioncam.methods.targets import Target

ScoreProjection = Callable[[Tensor], Tensor]
REPLAY_RTOL = 1e-3  # the replayed attention output against the module's own (fused kernels round otherwise)


def _is_timm_attention(module: nn.Module) -> bool:
    try:
        from timm.layers import Attention
    except ImportError:
        return False
    return type(module) is Attention


def attention_of(block: nn.Module) -> nn.Module | None:
    """The self-attention module directly inside ``block`` that LeGrad can read, or None."""
    for child in block.children():
        if isinstance(child, nn.MultiheadAttention) or _is_timm_attention(child):
            return child
    return None


def find_blocks(model: nn.Module, target_layer: str | nn.Module | None, count: int) -> list[nn.Module]:
    """The ``count`` transformer blocks ending at the one that holds ``target_layer`` (itself or an
    ancestor with a self-attention child), in order. Raises a one-line ``ValueError``."""
    target = find_layer(model, target_layer)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    parts = names[target].split(".") if names.get(target) else []
    for n in range(len(parts), 0, -1):  # the target, then its ancestors, innermost first
        block_name = ".".join(parts[:n])
        if attention_of(modules[block_name]) is None:
            continue
        parent = modules[".".join(parts[: n - 1])] if n > 1 else model
        siblings = [m for m in parent.children() if attention_of(m) is not None]
        at = next(i for i, m in enumerate(siblings) if m is modules[block_name])
        if count > at + 1:
            raise ValueError(f"legrad: blocks={count}, but model {model_name(model)} has {at + 1} transformer "
                             f"block(s) up to {block_name}")
        return siblings[at + 1 - count: at + 1]
    where = (names.get(target) or type(target).__name__).removeprefix("net.")  # as the user names it
    raise ValueError(f"legrad: model {model_name(model)} has no transformer block with self-attention at its target "
                     f"layer {where} (LeGrad explains vision transformers: torchvision vit_*, timm vit_*/deit_*); "
                     "use gradcam")


def default_projection(model: nn.Module) -> ScoreProjection:
    """The class scores of mean-pooled tokens through the model's final norm(s) and head (module
    docstring). Raises a one-line ``ValueError`` for a model whose head is not recognized."""
    net = getattr(model, "net", model)
    encoder = getattr(net, "encoder", None)
    ln, heads = getattr(encoder, "ln", None), getattr(net, "heads", None)
    if isinstance(ln, nn.Module) and isinstance(heads, nn.Module):  # torchvision VisionTransformer
        return lambda tokens: heads(ln(tokens.mean(dim=1)))
    parts = [getattr(net, a, None) for a in ("norm", "fc_norm", "head_drop")]
    head, dist = getattr(net, "head", None), getattr(net, "head_dist", None)
    if all(isinstance(p, nn.Module) for p in parts) and isinstance(head, nn.Module) \
            and getattr(net, "attn_pool", None) is None:  # timm ViT
        pre = nn.Sequential(*parts)  # type: ignore[arg-type]
        def project(tokens: Tensor) -> Tensor:
            pooled = pre(tokens.mean(dim=1))  # a distilled DeiT: its eval-mode logits average its two heads
            return (head(pooled) + dist(pooled)) / 2 if isinstance(dist, nn.Module) else head(pooled)

        return project
    raise ValueError(f"legrad: model {model_name(model)} has no head LeGrad knows (torchvision or timm ViT); pass "
                     "score_projection= (tokens B×N×C to class logits)")


def default_prefix(model: nn.Module) -> int:
    """The number of non-patch tokens before the patches (module docstring)."""
    net = getattr(model, "net", model)
    for source in (net, getattr(model, "reshape_transform", None)):
        n = getattr(source, "num_prefix_tokens", None) if source is net else getattr(source, "prefix_tokens", None)
        if isinstance(n, int):
            return n
    return 1


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``B×N×(H·d)`` to ``B×H×N×d``."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def _attention_parts(module: nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, float, Callable[[Tensor], Tensor]]:
    """``(q, k, v, scale, tail)`` of one call of a supported attention module: ``B×H×N×d`` queries,
    keys and values as the module computes them, the logit scale, and ``tail`` taking the per-head
    outputs ``softmax(scale·q kᵀ) v`` to the module's output tokens."""
    if isinstance(module, nn.MultiheadAttention):
        q_in, k_in, v_in = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")][len(args):])[:3]
        masks = [kwargs.get("key_padding_mask"), kwargs.get("attn_mask"), *args[3:4], *args[5:6]]
        if not (q_in is k_in and k_in is v_in) or not isinstance(q_in, Tensor) or q_in.dim() != 3:
            raise RuntimeError("legrad: the attention is not batch self-attention on B×N×C tokens")
        if not module.batch_first or not module._qkv_same_embed_dim or module.bias_k is not None \
                or module.add_zero_attn or any(m is not None for m in masks) or kwargs.get("is_causal"):
            raise RuntimeError("legrad: nn.MultiheadAttention with masks, added keys or sequence-first inputs is "
                               "not supported")
        b, n, e = q_in.shape
        q, k, v = (_split_heads(t, module.num_heads)
                   for t in F.linear(q_in, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1))
        return q, k, v, q.shape[-1] ** -0.5, lambda o: module.out_proj(o.transpose(1, 2).reshape(b, n, e))
    timm_attn: Any = module  # timm's Attention (attention_of checked the class)
    x = args[0]
    if (len(args) > 1 and args[1] is not None) or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
        raise RuntimeError("legrad: attention masks are not supported")
    b, n, _ = x.shape
    qkv = timm_attn.qkv(x).reshape(b, n, 3, timm_attn.num_heads, timm_attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = timm_attn.q_norm(q), timm_attn.k_norm(k)
    gate = timm_attn.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None

    def tail(o: Tensor) -> Tensor:
        o = timm_attn.norm(o.transpose(1, 2).reshape(b, n, timm_attn.attn_dim))
        return timm_attn.proj_drop(timm_attn.proj(o if gate is None else o * gate))

    return q, k, v, float(timm_attn.scale), tail


class LeGrad(CAM):
    """LeGrad: ``mean_l mean_{h,q} ReLU(∂s^l_c/∂A^l)`` over the last ``blocks`` transformer blocks
    (module docstring). Options ``blocks`` (2), ``prefix_tokens`` and ``score_projection``."""

    name = "legrad"
    class_targets = False  # a callable target scores each block's class scores; no class index is read

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None, *, blocks: int = 2,
                 prefix_tokens: int | None = None, score_projection: ScoreProjection | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"legrad: blocks must be an integer >= 1, got {blocks!r}")
        if prefix_tokens is not None and (not isinstance(prefix_tokens, int) or prefix_tokens < 0):
            raise ValueError(f"legrad: prefix_tokens must be an integer >= 0, got {prefix_tokens!r}")
        if score_projection is not None and not callable(score_projection):
            raise TypeError(f"legrad: score_projection must be a function of B×N×C tokens, got "
                            f"{type(score_projection).__name__}")
        self.blocks = blocks
        super().__init__(model, target_layer, **kwargs)
        self.reshape = None  # the grid comes from the attention's keys, not from a layer's tokens
        self.attentions = [a for a in map(attention_of, self.layers) if a is not None]  # find_blocks: one each
        self.project = score_projection if score_projection is not None else default_projection(model)
        self.prefix_tokens = default_prefix(model) if prefix_tokens is None else prefix_tokens
        self._tokens: list[Tensor | None] = [None] * len(self.layers)

    def _resolve_layers(self, target_layer: str | nn.Module | None) -> list[nn.Module]:
        return find_blocks(self.model, target_layer, self.blocks)

    @classmethod
    def check_model(cls, model: nn.Module, target_layer: str | nn.Module | None = None,
                    input_size: tuple[int, int] | None = None) -> None:
        find_blocks(model, target_layer, 1)
        default_projection(model)

    # -- hooks ------------------------------------------------------------------------------
    def _install_hooks(self) -> tuple[torch.utils.hooks.RemovableHandle, ...]:
        self._acts = [None] * len(self.layers)
        self._tokens = [None] * len(self.layers)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for i, (block, attention) in enumerate(zip(self.layers, self.attentions, strict=True)):
                handles.append(block.register_forward_pre_hook(self._detach_input))
                handles.append(block.register_forward_hook(functools.partial(self._block_output, i)))
                handles.append(attention.register_forward_hook(functools.partial(self._replay, i),
                                                               with_kwargs=True))
        finally:
            self._handles = tuple(handles)
        return self._handles

    @staticmethod
    def _detach_input(_module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """The block starts from a detached copy of its input: its score's gradient reaches its own
        attention only."""
        return tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)

    def _block_output(self, i: int, module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 3:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise RuntimeError(f"legrad: a transformer block must output B×N×C tokens, got {shape}")
        if self._tokens[i] is not None:
            raise RuntimeError(f"legrad: block {module.__class__.__name__} ran twice in one forward")
        self._tokens[i] = output

    def _replay(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any) -> Any:
        """Capture ``A^l`` as a leaf and return the attention output computed from it."""
        q, k, v, scale, tail = _attention_parts(module, args, kwargs)
        with torch.no_grad():
            attn = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        attn.requires_grad_(True)
        replayed = tail(attn @ v)
        own = output[0] if isinstance(output, tuple) else output
        if not isinstance(own, Tensor) or own.shape != replayed.shape or not torch.allclose(
                replayed, own, rtol=REPLAY_RTOL, atol=REPLAY_RTOL * (float(own.detach().abs().amax()) + 1e-12)):
            raise RuntimeError(f"legrad: cannot reproduce the output of {type(module).__name__} from its attention "
                               "(an attention variant LeGrad does not support)")
        self._acts[i] = attn
        return (replayed, *output[1:]) if isinstance(output, tuple) else replayed

    # -- pipeline ---------------------------------------------------------------------------
    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation:
        try:
            return super().__call__(images, targets)
        finally:
            self._tokens = [None] * len(self.layers)

    def class_score(self, logits: Tensor, targets: Tensor, scorers: list[Target] | None) -> Tensor:  # type: ignore[override]
        """``Σ_l Σ_b s^l_b[c_b]``: each block's class score (or each callable target on it)."""
        total = logits.new_zeros(())
        for tokens in self._tokens:
            assert tokens is not None
            scores = self.project(tokens)
            if not isinstance(scores, Tensor) or scores.shape != logits.shape:
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise RuntimeError(f"legrad: the score projection must give B×classes logits {tuple(logits.shape)}, "
                                   f"got {got}")
            total = total + super().class_score(scores, targets, scorers)
        return total

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        maps = []
        for g in grads:
            relevance = g.clamp_min(0).mean(dim=(1, 2))[:, self.prefix_tokens:]  # B × patch keys
            n = relevance.shape[-1]
            side = math.isqrt(n)
            if n == 0 or side * side != n:
                raise RuntimeError(f"legrad: {n + self.prefix_tokens} tokens less {self.prefix_tokens} prefix "
                                   "token(s) is not a square grid; pass prefix_tokens=")
            maps.append(relevance.reshape(-1, side, side))
        return torch.stack(maps).mean(dim=0), {}

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        raise NotImplementedError("LeGrad averages several blocks' maps: see compute_layers")
