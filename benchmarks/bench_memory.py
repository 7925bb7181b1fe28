"""Peak memory of a VGG16 UnionCAM worker, against the formula.

    python benchmarks/bench_memory.py [--batch-sizes 8,32,64]

Formula (fp32, 224×224, inference passes free each activation once the next layer has used it):

    peak ≈ W + B · (A₁ + A₂ + X) + G

with W = 138.4 M parameters × 4 B = 553 MB of weights, A₁ + A₂ = the two largest consecutive
activations of one image (conv1_1 → conv1_2: 2 × 64 × 224 × 224 × 4 B = 25.7 MB), X = the masked
input and its mask (0.8 MB), B the masked-forward batch size, and G the explaining forward/backward
of one image (A at features.29 and the classifier's graph: a few MB). So B = 64 ≈ 2.25 GB, the
paper's 2.22 GB; our default B = 32 ≈ 1.4 GB, leaving room for the CUDA context (~0.3-0.5 GB,
outside the allocator) within 2.5 GB.

On CUDA this measures ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's
peak RSS over the loaded model (an estimate: the CPU allocator keeps freed blocks). Each batch
size runs in a fresh subprocess: one explaining pass plus one batch of B masked forwards, the
part of UnionCAM that sets the peak (VGG16 with random weights; the weights' values do not
change memory).
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
from common import machine, random_vgg16_weights, table

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


def child(batch: int) -> dict[str, float]:
    from unioncam.methods import explain
    from unioncam.methods.base import masked_scores
    from unioncam.models import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm = load("vgg16", random_vgg16_weights())
    model = lm.model.to(device)
    x = torch.rand(1, 3, 224, 224, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1e6 - WEIGHTS_MB
    rss0 = _reset_peak_rss()
    res = explain(lm, x, "gradcam")
    masks = torch.rand(batch, 224, 224, device=device)
    masked_scores(model, x, res.targets, torch.zeros(batch, dtype=torch.long, device=device), masks, batch)
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 1e6 - base, "what": "cuda max_memory_allocated"}
    rss1 = _peak_rss()
    return {"peak_mb": WEIGHTS_MB + (rss1 - rss0), "what": "CPU: weights + peak RSS growth"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    print(f"# bench_memory: VGG16 (random weights), 224×224, fp32; {machine()}")
    random_vgg16_weights()  # written once, before the children read it
    rows = []
    for b in map(int, args.batch_sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(b)], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([b, f"{predicted_mb(b):.0f}", f"{got['peak_mb']:.0f}", got["what"]])
        print(f"batch {b}: predicted {predicted_mb(b):.0f} MB, measured {got['peak_mb']:.0f} MB", flush=True)
    print()
    print(table(rows, ["masked batch B", "formula MB", "measured MB", "measured as"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
