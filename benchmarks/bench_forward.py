"""The forward-only pass (every masked forward and metric forward) under each speed option, side by side.

    python benchmarks/bench_forward.py [--device cuda] [--models efficientnet_lite0,torchvision:resnet50]
                                       [--size 112] [--batch-sizes 4,32] [--rounds 10] [--compile]

For each model and batch size: seconds per forward (median of ``--rounds``, interleaved so the machine's
drift hits every variant alike, after one warm-up each) of ``unioncam.load(...)`` with NCHW weights,
with ``channels_last`` weights, and with ``channels_last`` and ``fuse`` (BatchNorm folded into the
convolutions of a copy, activations in place: the job's CPU default), the ratio to NCHW and to
channels_last, and the largest logit difference from NCHW. ``--compile`` adds ``channels_last`` +
``torch.compile`` (padded to the batch, as the job's GPU workers), compiled in its warm-up call, which is
not timed. Inputs are random images in ``[0, 1]``; every variant runs under ``torch.inference_mode`` in
IEEE fp32. EfficientNet-Lite0 has its real weights; ``torchvision:`` models are built with seeded random
weights (the architecture is what matters for speed).
"""

from __future__ import annotations

import argparse

import torch
from common import add_device_arg, device_of, machine, median, table, timed

import unioncam
from unioncam.ops import ieee_fp32


def build(name: str, size: int, channels_last: bool = False, fuse: bool = False) -> unioncam.LoadedModel:
    if name.startswith("torchvision:"):
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = getattr(torchvision.models, name.partition(":")[2])(weights=None).eval()  # as users load it
        return unioncam.load(net, input_size=size, class_names=[str(i) for i in range(1000)],
                             channels_last=channels_last, fuse=fuse)
    return unioncam.load(name, input_size=size, channels_last=channels_last, fuse=fuse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet_lite0,torchvision:resnet50")
    p.add_argument("--size", type=int, default=112, help="input side (default 112)")
    p.add_argument("--batch-sizes", default="4,32", help="forwards of these many images (default 4,32: the job's "
                                                         "CPU masked batch and bench_methods')")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="add channels_last + torch.compile")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    print(f"# bench_forward: {args.size}×{args.size}, batches {args.batch_sizes}, {args.rounds} rounds; "
          f"{machine(device)}", flush=True)
    rows = []
    for name in args.models.split(","):
        variants = {"NCHW": {}, "channels_last": {"channels_last": True},
                    "channels_last + fuse": {"channels_last": True, "fuse": True}}
        if args.compile:
            variants["channels_last + compile"] = {"channels_last": True}  # compiled per batch size below
        models = {v: build(name, args.size, **o).model.to(device) for v, o in variants.items()}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for v, m in models.items():
                if v.endswith("compile"):
                    m.compile_inference(pad_to=batch)  # one padded shape, as the job's workers
            x = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
            times: dict[str, list[float]] = {v: [] for v in models}
            outs: dict[str, torch.Tensor] = {}
            with ieee_fp32(), torch.inference_mode():
                for round_ in range(args.rounds + 1):  # round 0: warm-up (and compilation), not timed
                    for v, m in models.items():
                        seconds, outs[v] = timed(lambda m=m, x=x: m(x), device)
                        if round_:
                            times[v].append(seconds)
            fused = models["channels_last + fuse"].fused()
            folded = f" ({len(fused.pairs)} folded, {fused.inplace} in place)" if fused is not None else " (none)"
            base, cl = median(times["NCHW"]), median(times["channels_last"])
            for v in models:
                t = median(times[v])
                diff = float((outs[v] - outs["NCHW"]).abs().max())
                rows.append([name, batch, v + (folded if v.endswith("fuse") else ""), f"{t:.4f}", f"{base / t:.2f}×",
                             f"{cl / t:.2f}×", f"{diff:.1e}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(table(rows, ["model", "batch", "variant", "s/forward", "NCHW / it", "channels_last / it",
                       "max logit difference to NCHW"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
