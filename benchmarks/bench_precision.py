"""Reduced precision for UnionCAM's masked forwards: speed and the change in Average Drop / Increase.

    python benchmarks/bench_precision.py [--precisions fp32,bf16,fp16] [--images 8]

Runs UnionCAM on the bundled sample's real photos (efficientnet_lite0, channels_last) once per
precision, interleaved image by image, then scores every map in fp32 (Y, O as the service does)
so the AD/AI difference is the method's alone. Besides the dataset means it prints, per precision,
the largest per-image change of the drop, how many images change their increase indicator
``O > Y``, and the maps' largest and mean absolute difference to the first precision's.

fp16 on a CPU has no native kernels here: its speed is meaningless, but it rounds as a GPU's fp16
does, so its AD/AI change previews the GPU's.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from common import machine, table, timed

import unioncam
from unioncam.data.sample import IMAGENET_LABELS, sample_photo_paths
from unioncam.metrics import average_drop, average_increase, confidence
from unioncam.viz import load_image


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--images", type=int, default=len(IMAGENET_LABELS))
    args = p.parse_args()
    precisions = args.precisions.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore", "precision 'fp16' on CPU")  # the docstring says it
    lm = unioncam.load("efficientnet_lite0", channels_last=True)
    model = lm.model.to(device)
    paths = list(sample_photo_paths(list(IMAGENET_LABELS)[: args.images]).values())
    x = torch.stack([load_image(q, lm.input_size) for q in paths]).to(device)
    print(f"# bench_precision: UnionCAM, efficientnet_lite0, {len(paths)} sample photos; {machine()}")
    seconds = {q: 0.0 for q in precisions}
    maps: dict[str, list[torch.Tensor]] = {q: [] for q in precisions}
    targets = unioncam.explain(lm, x, "gradcam").targets
    for i in range(len(paths)):
        for q in precisions:
            t, res = timed(lambda i=i, q=q: unioncam.explain(lm, x[i:i + 1], "unioncam", targets=targets[i:i + 1],
                                                             precision=q))
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
