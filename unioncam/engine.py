"""The inference engine that methods and metrics share: the predicted class, batched probabilities
of masked inputs (with a per-process count of them, for progress), and batch sizes from the device
(the GPU memory plan). It knows nothing of CAMs: :mod:`unioncam.methods`, :mod:`unioncam.evaluation`,
ROAD, the sanity check and the service all import it (ops → engine → models → methods).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unioncam.ops import Precision, autocast, chunks, ieee_fp32


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model).

    Lazy: only the modules up to the first tensor are visited (unpacking every parameter and buffer
    took 0.5 ms per call for EfficientNet-Lite0 on two CPU cores, every CAM construction pays it)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def predict(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(classes, logits)``: the predicted class of each image (``B``, the logits' argmax) and the
    ``B×C`` logits, from one forward in IEEE fp32 (:func:`ieee_fp32`) under inference mode.

    The argmax is taken outside inference mode, so ``classes`` is an ordinary tensor that the
    methods' backward may use as targets (an inference tensor cannot be saved for backward).
    """
    with torch.inference_mode(), ieee_fp32():
        logits = model(images)
    return logits.argmax(dim=1), logits


def default_batch_size(device: torch.device) -> int:
    """Masked inputs per forward when not given: 4 on CPU (benchmarks/bench_unioncam.py: fastest
    per image for EfficientNet-Lite0 on two cores; 8 was 1.2-1.3× slower), 32 on accelerators
    (VGG16's peak memory ≈ 0.55 GB of weights + 25.7 MB per masked input, so 32 keeps a worker
    near 1.4 GB, under the paper's 2.22 GB; see benchmarks/bench_memory.py)."""
    return 4 if device.type == "cpu" else 32


MAX_BATCH = 256  # masked inputs per forward: beyond this, the H100 runs gained nothing
DEFAULT_GPU_MEMORY_GIB = 4.0  # the job's --max-gpu-memory default (docs/performance.md: the trade-off against 2.5 GiB)
GPU_RESERVE = 768 << 20  # bytes kept for cuDNN workspaces, autocast weight copies and the allocator's slack


@dataclass(frozen=True)
class GPUPlan:
    """Batch sizes derived from a memory budget (:func:`gpu_plan`); all sizes in bytes."""

    batch_size: int
    images_per_batch: int
    budget: int
    fixed: int
    per_input: int


def gpu_plan(model: nn.Module, size: tuple[int, int], precision: str, max_gib: float,
             free: int | None = None) -> GPUPlan:
    """Masked batch size and images per call for one worker's GPU.

    ``budget = min(max_gib GiB, 0.9 × free)`` (``free``: the device's free memory, from
    ``torch.cuda.mem_get_info`` when None). Peak ≈ ``fixed + B × per_input`` where ``fixed`` is the
    weights and buffers plus :data:`GPU_RESERVE`, and ``per_input`` is, from one dry forward at
    batch 1, twice the two largest consecutive module outputs (the live input and output of the
    widest layer, and autocast's copies) at the precision's element size, plus the input and its mask
    in fp32. ``B`` is the largest multiple of 8 (or any size below 8) that fits, at most
    :data:`MAX_BATCH`; images per call ``= clamp(B // 8, 1, 32)``, so one call's masked inputs span
    several images and the last batch of each image rarely runs half empty.
    """
    device = model_device(model)
    if free is None:
        free = int(torch.cuda.mem_get_info(device)[0])
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()) if isinstance(out, Tensor)
                                     else None)
             for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, 3, *size), device=device))
    finally:
        for h in hooks:
            h.remove()
    element = 2 if precision in ("fp16", "bf16") else 4
    widest = max((a + b for a, b in itertools.pairwise(sizes)), default=max(sizes, default=0))
    per_input = 2 * element * widest + 2 * 4 * 3 * size[0] * size[1]
    fixed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) + GPU_RESERVE
    budget = int(min(max_gib * (1 << 30), 0.9 * free))
    fit = max(1, (budget - fixed) // max(per_input, 1))
    batch = min(MAX_BATCH, int(fit))
    if batch >= 8:
        batch -= batch % 8
    return GPUPlan(batch, max(1, min(32, batch // 8)), budget, fixed, per_input)


_masked_inputs = 0  # masked inputs this process has run through batched_probs (see masked_inputs())


def masked_inputs() -> int:
    """How many masked inputs this process has run through :func:`batched_probs` so far (every
    score-based method and every metric forward): a progress count *within* an image, whose
    methods and metrics may need thousands of forwards."""
    return _masked_inputs


def batched_probs(model: nn.Module, targets: Tensor, inputs: Callable[[slice], Tensor], n: int,
                  batch_size: int, precision: Precision = "fp32") -> Tensor:
    """``f_{targets[j]}(inputs(j))`` for ``j < n``: inputs built and run ``batch_size`` at a time.

    Args:
        targets: ``n`` class per input.
        inputs: returns the ``len(slice)×3×H×W`` inputs of a slice of ``0..n``, so only one
            batch of inputs exists at a time and peak memory is bounded by ``batch_size``.
    Returns:
        ``n`` softmax probabilities on the targets' device, without any host synchronization.
    """
    global _masked_inputs
    out: Tensor | None = None
    for sl in chunks(n, batch_size):
        x = inputs(sl)
        _masked_inputs += x.shape[0]
        with torch.inference_mode(), autocast(x.device, precision):
            logits = model(x)
        if out is None:
            out = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out[sl] = logits.to(out.dtype).softmax(-1).gather(1, targets[sl][:, None])[:, 0]
    return out if out is not None else torch.empty(0, device=targets.device)


def masked_scores(model: nn.Module, images: Tensor, targets: Tensor, index: Tensor,
                  masks: Tensor | Callable[[slice], Tensor], batch_size: int,
                  precision: Precision = "fp32") -> Tensor:
    """``f_c(M_n ⊙ I_{index[n]})`` for ``n`` masked inputs, ``batch_size`` per forward.

    Args:
        images: ``B×3×H×W`` pixel-space images.
        targets: ``B`` class per image.
        index: ``N`` image index of each masked input; masked inputs of different images
            share forward batches.
        masks: ``N×H×W`` masks, or a function returning the masks of a slice of ``0..N`` (so
            masks can be built one chunk at a time and peak memory stays bounded).
    Returns:
        ``N`` softmax probabilities, on the images' device, without any host synchronization.
    """

    def inputs(sl: slice) -> Tensor:
        m = masks[sl] if isinstance(masks, Tensor) else masks(sl)
        return m[:, None] * images[index[sl]]

    return batched_probs(model, targets[index], inputs, index.numel(), batch_size, precision)
