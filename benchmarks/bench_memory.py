"""Peak memory of a VGG16 UnionCAM worker, against the formula and the library's GPU planner.

    python benchmarks/bench_memory.py [--device cuda] [--batch-sizes 8,32,64] [--model vgg16] [--precision auto]

Formula (fp32, 224×224, inference passes free each activation once the next layer has used it):

    peak ≈ W + B · (A₁ + A₂ + X) + G

with W = 138.4 M parameters × 4 B = 553 MB of weights, A₁ + A₂ = the two largest consecutive
activations of one image (conv1_1 → conv1_2: 2 × 64 × 224 × 224 × 4 B = 25.7 MB), X = the masked
input and its mask (0.8 MB), B the masked-forward batch size, and G the explaining forward/backward
of one image (A at features.29 and the classifier's graph: a few MB). So B = 64 ≈ 2.25 GB, the
paper's 2.22 GB; our default B = 32 ≈ 1.4 GB, leaving room for the CUDA context (~0.3-0.5 GB,
outside the allocator) within 2.5 GB.

Next to each measurement it prints the estimate of the planner the service sizes GPU batches with,
:func:`unioncam.engine.gpu_plan`: ``fixed + B × per_input``, where ``fixed`` is the weights
and buffers plus :data:`~unioncam.methods.base.GPU_RESERVE` (768 MiB kept for cuDNN workspaces,
autocast's weight copies and the allocator's slack) and ``per_input`` comes from one dry forward at
the masked forwards' precision; also without the reserve, and the measurement's ratio to the
planner. The hand formula above is VGG16's in fp32 at 224² ("-" for other models).

``--device`` (default: cuda when ``torch.cuda.is_available()``, else cpu; the header line names the
device and the GPU) is where each child runs the model and its inputs; ``--device cuda`` without
CUDA is a one-line error. On CUDA this measures ``torch.cuda.max_memory_allocated``; on CPU the
growth of the process's peak RSS over the loaded model (an estimate: the CPU allocator keeps freed
blocks). ``--precision`` is that of the masked forwards (default auto, as the service: fp16 on
CUDA, fp32 on CPU; the explaining pass is always fp32). ``--model`` picks the network: vgg16
(default; random weights, whose values do not change memory), efficientnet_lite0, or tiny_cnn for
a quick smoke run. Each batch size runs in a fresh subprocess: one explaining pass plus one batch
of B masked forwards, the part of UnionCAM that sets the peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from common import add_device_arg, device_of, machine, random_vgg16_weights, table

from unioncam.engine import GPU_RESERVE
from unioncam.models import LoadedModel, load
from unioncam.ops import PRECISION_CHOICES, resolve_precision

WEIGHTS_MB = 138_357_544 * 4 / 1e6
PER_INPUT_MB = (2 * 64 * 224 * 224 * 4 + 4 * 224 * 224 * 4) / 1e6


def predicted_mb(batch: int) -> float:
    return WEIGHTS_MB + batch * PER_INPUT_MB + 10.0


def _peak_rss() -> float:
    """The process's peak resident set (MB): VmHWM, which :func:`_reset_peak_rss` can reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _reset_peak_rss() -> float:
    """Reset the peak to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``), so loading
    the weights (state dict + model, twice the weights for a moment) does not count; returns it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss()


def _load(name: str) -> LoadedModel:
    return load(name, random_vgg16_weights() if name == "vgg16" else None)


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def child(batch: int, name: str, device_name: str, precision: str) -> dict[str, float | str]:
    from unioncam.engine import gpu_plan, masked_scores
    from unioncam.methods import explain

    device = torch.device(device_name)
    lm = _load(name)
    model = lm.model.to(device)
    size = lm.input_size
    weights_mb = _state_bytes(model) / 1e6
    q = resolve_precision(precision, device)
    x = torch.rand(1, 3, *size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 1e6 - weights_mb
    rss0 = _reset_peak_rss()
    res = explain(lm, x, "gradcam")
    masks = torch.rand(batch, *size, device=device)
    masked_scores(model, x, res.targets, torch.zeros(batch, dtype=torch.long, device=device), masks, batch, q)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        got: dict[str, float | str] = {"peak_mb": torch.cuda.max_memory_allocated(device) / 1e6 - base,
                                       "what": "cuda max_memory_allocated"}
    else:
        got = {"peak_mb": weights_mb + (_peak_rss() - rss0), "what": "CPU: weights + peak RSS growth"}
    # After the measurement: the planner's dry forward must not count. Its fixed and per-input sizes do
    # not depend on the budget; the batch it picks does (4 GiB: the service's --max-gpu-memory default).
    plan = gpu_plan(model, size, q, 4.0, None if device.type == "cuda" else 1 << 50)
    return {**got, "fixed_mb": plan.fixed / 1e6, "per_input_mb": plan.per_input / 1e6,
            "weights_mb": weights_mb, "plan_batch": plan.batch_size, "precision": q}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--model", default="vgg16", choices=("vgg16", "efficientnet_lite0", "tiny_cnn"))
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="the masked forwards' (default auto: fp16 on CUDA, fp32 on CPU)")
    add_device_arg(p)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.model, args.device, args.precision)))
        return 0
    device = device_of(args.device)
    q = resolve_precision(args.precision, device)
    lm = _load(args.model)  # on CPU, for its input size (written once, before the children read it)
    size = lm.input_size
    formula = args.model == "vgg16" and size == (224, 224)
    what = "VGG16 (random weights)" if args.model == "vgg16" else \
        f"{args.model} ({'random' if args.model == 'tiny_cnn' else 'ImageNet'} weights)"
    print(f"# bench_memory: {what}, {size[0]}×{size[1]}, masked forwards in {q}; {machine(device)}")
    del lm
    rows = []
    reserve_mb = GPU_RESERVE / 1e6
    plan_line = ""
    for b in map(int, args.batch_sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(b), "--model", args.model,
                              "--device", str(device), "--precision", q], capture_output=True, text=True)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"batch {b}: the measuring subprocess failed (exit {out.returncode}): {tail}", file=sys.stderr)
            return 1
        got = json.loads(out.stdout.strip().splitlines()[-1])
        planner = got["fixed_mb"] + b * got["per_input_mb"]
        bare = planner - reserve_mb
        plan_line = (f"planner (gpu_plan, {got['precision']}): fixed {got['fixed_mb']:.0f} MB (weights and buffers "
                     f"{got['weights_mb']:.0f} + reserve {reserve_mb:.0f}) + B × {got['per_input_mb']:.2f} MB per "
                     f"masked input; at a 4 GiB budget it picks B = {got['plan_batch']}")
        rows.append([b, f"{predicted_mb(b):.0f}" if formula else "-", f"{planner:.0f}", f"{bare:.0f}",
                     f"{got['peak_mb']:.0f}", f"{got['peak_mb'] / planner:.2f}", f"{got['peak_mb'] / bare:.2f}",
                     got["what"]])
        print(f"batch {b}: " + (f"formula {predicted_mb(b):.0f} MB, " if formula else "")
              + f"planner {planner:.0f} MB ({bare:.0f} without the reserve), measured {got['peak_mb']:.0f} MB",
              flush=True)
    print(plan_line)
    print()
    print(table(rows, ["masked batch B", "formula MB (fp32)", "planner MB", "planner − reserve MB", "measured MB",
                       "measured / planner", "measured / (planner − reserve)", "measured as"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
