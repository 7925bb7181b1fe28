"""Reduced precision for UnionCAM's masked forwards: speed and the change in Average Drop / Increase.

    python benchmarks/bench_precision.py [--precisions fp32,bf16] [--images 8]

Runs UnionCAM on the bundled sample's real photos (efficientnet_lite0, channels_last) once per
precision, interleaved image by image, then scores every map in fp32 (Y, O as the service does)
so the AD/AI difference is the method's alone. fp16 needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from common import machine, table, timed

import unioncam
from unioncam.data.sample import IMAGENET_LABELS, sample_photo_paths
from unioncam.metrics import average_drop, average_increase, confidence
from unioncam.viz import load_image


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--images", type=int, default=len(IMAGENET_LABELS))
    args = p.parse_args()
    precisions = args.precisions.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm = unioncam.load("efficientnet_lite0", channels_last=True)
    model = lm.model.to(device)
    paths = list(sample_photo_paths(list(IMAGENET_LABELS)[: args.images]).values())
    x = torch.stack([load_image(q, lm.input_size) for q in paths]).to(device)
    print(f"# bench_precision: UnionCAM, efficientnet_lite0, {len(paths)} sample photos; {machine()}")
    seconds = {q: 0.0 for q in precisions}
    maps = {q: [] for q in precisions}
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
    for q in precisions:
        m = torch.cat(maps[q])
        y, o = confidence(model, x, m, targets)  # fp32 scoring
        ad, ai = float(average_drop(y, o).mean()), float(average_increase(y, o).mean())
        diff = float((m - torch.cat(maps[precisions[0]])).abs().max())
        rows.append([q, f"{seconds[q] / len(paths):.2f}", f"{seconds[precisions[0]] / seconds[q]:.2f}×",
                     f"{ad:.2f}", f"{ai:.2f}", f"{diff:.3f}"])
    print()
    print(table(rows, ["precision", "s/image", f"speedup vs {precisions[0]}", "Average Drop %", "Average Increase %",
                       f"max |map − {precisions[0]} map|"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
