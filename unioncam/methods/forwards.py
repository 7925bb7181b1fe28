"""Batched forward-only passes that score a class's *logit* (the engine's
:func:`unioncam.engine.batched_probs` scores its softmax probability), optionally with a forward hook on
one layer during each batch (Ablation-CAM replaces channels of the target layer's output).

The passes count in the engine's masked-input counter (:func:`unioncam.engine.masked_inputs`), so
progress includes them like every other masked forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import unioncam.engine as engine
from unioncam.ops import Precision, autocast, chunks

LayerHook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]


def count_masked_inputs(n: int) -> None:
    """Add ``n`` to the engine's per-process count of masked inputs (progress within an image)."""
    engine._masked_inputs += n  # the engine's counter: it has no public increment (yet)


def batched_logits(model: nn.Module, targets: Tensor, inputs: Callable[[slice], Tensor], n: int, batch_size: int,
                   precision: Precision = "fp32", layer: nn.Module | None = None,
                   hook: Callable[[slice], LayerHook] | None = None, count: bool = True) -> Tensor:
    """``S_{targets[j]}(inputs(j))`` for ``j < n`` (logits), ``batch_size`` inputs per forward.

    Args:
        inputs: the ``len(slice)×3×H×W`` inputs of a slice of ``0..n`` (built one batch at a time), or
            one ``1×3×H×W`` input that ``hook`` widens to the slice at ``layer`` (Ablation-CAM's one copy).
        layer, hook: when given, ``hook(slice)`` is registered as a forward hook on ``layer`` for that
            batch's forward only (removed right after it, also on an exception).
        count: add the inputs to the masked-input count (False for a check whose inputs count elsewhere).
    Returns:
        ``n`` logits in at least fp32, on the targets' device, without host synchronization.
    Raises:
        RuntimeError: the model's output is not one row of logits per input of the slice.
    """
    out: Tensor | None = None
    for sl in chunks(n, batch_size):
        x = inputs(sl)
        rows = sl.stop - sl.start
        if count:
            count_masked_inputs(rows)
        handle = layer.register_forward_hook(hook(sl)) if layer is not None and hook is not None else None
        try:
            with torch.inference_mode(), autocast(x.device, precision):
                logits = model(x)
        finally:
            if handle is not None:
                handle.remove()
        if logits.dim() != 2 or logits.shape[0] != rows:
            raise RuntimeError(f"the model gave {tuple(logits.shape)} logits for {rows} inputs")
        if out is None:
            out = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out[sl] = logits.to(out.dtype).gather(1, targets[sl][:, None])[:, 0]
    return out if out is not None else torch.empty(0, device=targets.device)
