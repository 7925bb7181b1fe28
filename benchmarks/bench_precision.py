"""Reduced precision for UnionCAM's masked forwards: speed and the change in Average Drop / Increase.

    python benchmarks/bench_precision.py [--device cuda] [--precisions fp32,tf32,bf16,fp16] [--images 8]

Runs UnionCAM on the bundled sample's real photos (efficientnet_lite0, channels_last) once per
precision, interleaved image by image, then scores every map in fp32 (Y, O as the service does)
so the AD/AI difference is the method's alone. Besides the dataset means it prints, per precision,
the largest per-image change of the drop, how many images change their increase indicator
``O > Y``, and the maps' largest and mean absolute difference to the first precision's.

``--device`` (default: cuda when ``torch.cuda.is_available()``, else cpu; the header line names the
device and the GPU) is where the model, the photos and every pass run; ``--device cuda`` without CUDA
is a one-line error. The default precisions are ``fp32,tf32,bf16,fp16`` on CUDA (fp32 is IEEE fp32,
TF32 off; tf32 runs fp32 tensors with TF32 convolutions and matmuls; see
:func:`unioncam.ops.resolve_precision`) and ``fp32,bf16,fp16`` on CPU (where tf32 is fp32). On CUDA
each precision first runs once untimed on the first photo (CUDA context, cuDNN's algorithm choice),
and every timer is read after ``torch.cuda.synchronize()``.

fp16 on a CPU has no native kernels here: its speed is meaningless, but it rounds as a GPU's fp16
does, so its AD/AI change previews the GPU's.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from common import add_device_arg, device_of, machine, table, timed

import unioncam
from unioncam.data.sample import IMAGENET_LABELS, sample_photo_paths
from unioncam.evaluation import average_drop, average_increase, confidence
from unioncam.ops import PRECISIONS
from unioncam.viz import load_image


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default=None,
                   help="comma-separated, the first is the reference (default: fp32,tf32,bf16,fp16 on CUDA, "
                        "fp32,bf16,fp16 on CPU)")
    p.add_argument("--images", type=int, default=len(IMAGENET_LABELS))
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    spec = args.precisions or ("fp32,tf32,bf16,fp16" if device.type == "cuda" else "fp32,bf16,fp16")
    precisions = [q.strip() for q in spec.split(",") if q.strip()]
    bad = [q for q in precisions if q not in PRECISIONS]
    if bad or not precisions:
        p.error(f"--precisions: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(PRECISIONS)}")
    warnings.filterwarnings("ignore", "precision 'fp16' on CPU")  # the docstring says it
    lm = unioncam.load("efficientnet_lite0", channels_last=True)
    model = lm.model.to(device)
    paths = list(sample_photo_paths(list(IMAGENET_LABELS)[: args.images]).values())
    x = torch.stack([load_image(q, lm.input_size) for q in paths]).to(device)
    ieee = " (fp32 = IEEE fp32, TF32 off)" if device.type == "cuda" and "fp32" in precisions else ""
    print(f"# bench_precision: UnionCAM, efficientnet_lite0, {len(paths)} sample photos, "
          f"{', '.join(precisions)}{ieee}; {machine(device)}")
    seconds = {q: 0.0 for q in precisions}
    maps: dict[str, list[torch.Tensor]] = {q: [] for q in precisions}
    targets = unioncam.explain(lm, x, "gradcam").targets
    if device.type == "cuda":  # untimed: CUDA context, cuDNN's algorithm choice per precision
        for q in precisions:
            unioncam.explain(lm, x[:1], "unioncam", targets=targets[:1], precision=q)
    for i in range(len(paths)):
        for q in precisions:
            t, res = timed(lambda i=i, q=q: unioncam.explain(lm, x[i:i + 1], "unioncam", targets=targets[i:i + 1],
                                                             precision=q), device)
            seconds[q] += t
            maps[q].append(res.maps)
        print(f"image {i + 1}/{len(paths)}: " + ", ".join(f"{q} {seconds[q] / (i + 1):.2f} s" for q in precisions),
              flush=True)
    rows = []
    base = precisions[0]
    scores = {}
    for q in precisions:
        y, o = confidence(model, x, torch.cat(maps[q]), targets)  # fp32 scoring
        scores[q] = average_drop(y, o), average_increase(y, o)
    for q in precisions:
        m, m0 = torch.cat(maps[q]), torch.cat(maps[base])
        drop, inc = scores[q]
        rows.append([q, f"{seconds[q] / len(paths):.2f}", f"{seconds[base] / seconds[q]:.2f}×",
                     f"{float(drop.mean()):.2f}", f"{float(drop.mean() - scores[base][0].mean()):+.2f}",
                     f"{float(inc.mean()):.2f}", int((inc != scores[base][1]).sum()),
                     f"{float((drop - scores[base][0]).abs().max()):.2f}",
                     f"{float((m - m0).abs().max()):.4f}", f"{float((m - m0).abs().mean()):.5f}"])
    print()
    print(table(rows, ["precision", "s/image", f"speedup vs {base}", "Average Drop %", "ΔAD", "Average Increase %",
                       "images whose O>Y flips", "max per-image Δdrop", f"max |map − {base}|",
                       f"mean |map − {base}|"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
