"""Service overhead: the Ray job with one worker against the library in-process, same images and work.

    python benchmarks/bench_service.py [--device cuda] [--methods unioncam] [--metrics ad,ai]
                                       [--images 256] [--shard-size 64] [--model vgg16]

In-process: :class:`unioncam.service.worker.ShardEvaluator` over every shard in this process
(model loaded once, not timed). Ray: ``unioncam.service.runner.run`` with one worker, timed from the
call to its return, so it pays for starting Ray, the actor, its model load (and, on a GPU, its
torch.compile warm-up), scheduling, Parquet and the manifest. The ratio of throughputs (in-process
time / Ray time) is the service's efficiency. The in-process run goes first and last and its mean
is used, so drift hits both sides alike. Both sides use the same config (precision, batch sizes,
compile: the library's defaults for the device unless given).

``--device`` (default: cuda when ``torch.cuda.is_available()``, else cpu; the header line names the
device and the GPU; ``--device cuda`` without CUDA is a one-line error) is where the in-process
evaluator runs; the Ray worker asks for one GPU on cuda (Ray picks it: on a multi-GPU machine it
may be another than ``cuda:N``) and for none on cpu. The images are the sample's photos, repeated
to ``--images`` in all (default: 256 on cuda, the sample's 8 on cpu) and written as shards of
``--shard-size`` (default: 64 on cuda, the sample's 4 on cpu). The model defaults to VGG16 with
seeded random weights on cuda (``benchmarks/common.random_vgg16_weights``: VGG16's cost without a
download) and to efficientnet_lite0 (real weights) on cpu; ``--model tiny_cnn`` makes a smoke run.

Besides the times it prints how busy each side kept the device: on a GPU, the mean of
``torch.cuda.utilization()`` (NVML's share of time a kernel ran, of the busiest GPU) sampled every
0.1 s, when available (it needs pynvml: ``pip install nvidia-ml-py``); always, the share of wall
time spent inside the shard evaluation (the sum of the per-shard ``seconds``, for Ray from its
manifest, over the wall time). The output says which is which.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from common import add_device_arg, device_of, machine, random_vgg16_weights, table, timed

from unioncam.data.sample import IMAGENET_LABELS, sample_samples
from unioncam.data.shards import Sample, expand_shards, write_shards
from unioncam.ops import PRECISION_CHOICES, resolve_precision
from unioncam.service.config import EvalConfig
from unioncam.service.runner import run
from unioncam.service.worker import ShardEvaluator

SAMPLE_SHARD_SIZE = 4  # unioncam.data.sample.write_sample_shards' default


def write_bench_shards(out: Path, images: int, shard_size: int) -> str:
    """The ImageNet sample's photos repeated to ``images`` samples (keys suffixed ``_rN`` after the
    first round), in shards of ``shard_size``; returns the shards' glob."""
    base = list(sample_samples("imagenet"))

    def samples() -> Iterator[Sample]:
        for i in range(images):
            s, rep = base[i % len(base)], i // len(base)
            yield Sample(s.key if rep == 0 else f"{s.key}_r{rep}", s.image, s.ext, s.label, s.meta)

    write_shards(samples(), out, "bench-imagenet", shard_size,
                 {"dataset": "bench", "source": "the ImageNet sample's photos, repeated (benchmarks/bench_service.py)"})
    return str(out / "bench-imagenet-*.tar")


class GPUBusy:
    """Samples ``torch.cuda.utilization()`` (NVML; the busiest visible GPU) every ``interval`` s in a
    thread while :meth:`sampling` is entered; :attr:`why` says why not when it cannot."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.interval = interval
        self.why: str | None = None
        if device.type != "cuda":
            self.why = "no GPU"
            return
        try:
            torch.cuda.utilization(device)
        except Exception as exc:  # pynvml missing (ModuleNotFoundError), NVML errors
            first = (str(exc).splitlines() or [""])[0]
            self.why = f"torch.cuda.utilization unavailable: {type(exc).__name__}: {first}"

    @contextlib.contextmanager
    def sampling(self) -> Iterator[list[float]]:
        samples: list[float] = []
        if self.why is not None:
            yield samples
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    samples.append(max(torch.cuda.utilization(i) for i in range(torch.cuda.device_count())) / 100)
                except Exception:
                    return
                stop.wait(self.interval)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="unioncam")
    p.add_argument("--metrics", default="ad,ai")
    add_device_arg(p)
    p.add_argument("--model", default=None, choices=("vgg16", "efficientnet_lite0", "tiny_cnn"),
                   help="default: vgg16 (random weights) on cuda, efficientnet_lite0 on cpu")
    p.add_argument("--images", type=int, default=None,
                   help=f"images in all, the sample's photos repeated (default: 256 on cuda, {len(IMAGENET_LABELS)} "
                        "on cpu)")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"images per shard (default: 64 on cuda, {SAMPLE_SHARD_SIZE} on cpu)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="the methods' masked forwards, both sides (default auto: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, default=None,
                   help="never torch.compile (default: the library's, on for GPU workers, off on CPU)")
    args = p.parse_args()
    device = device_of(args.device)
    gpu = device.type == "cuda"
    model = args.model or ("vgg16" if gpu else "efficientnet_lite0")
    images = args.images or (256 if gpu else len(IMAGENET_LABELS))
    shard_size = args.shard_size or (64 if gpu else SAMPLE_SHARD_SIZE)
    if images < 1 or shard_size < 1:
        p.error("--images and --shard-size must be >= 1")
    weights = str(random_vgg16_weights()) if model == "vgg16" else None
    busy = GPUBusy(device)
    tmp = Path(tempfile.mkdtemp(prefix="unioncam-bench-"))
    try:
        pattern = write_bench_shards(tmp / "shards", images, shard_size)
        shards = expand_shards(pattern)

        def cfg(out: str) -> EvalConfig:
            return EvalConfig(shards=pattern, out=str(tmp / out), model=model, weights=weights,
                              methods=args.methods.split(","), metrics=args.metrics.split(","), workers=1,
                              gpus_per_worker=1.0 if gpu else 0.0, precision=args.precision, compile=args.compile,
                              report=False).resolved()

        evaluator = ShardEvaluator(cfg("inproc"), device)
        n = 0
        inner: list[float] = []

        def in_process(out: str) -> None:
            nonlocal n
            counts = [evaluator.evaluate(s, tmp / out) for s in shards]
            n = sum(c["images"] for c in counts)
            inner.append(sum(c["seconds"] for c in counts))

        what = f"{model} (random weights)" if model in ("vgg16", "tiny_cnn") else model
        print(f"# bench_service: {args.methods} on {images} images (the sample's photos repeated) in {len(shards)} "
              f"shard(s) of ≤ {shard_size}, {what}, precision {resolve_precision(args.precision, device)}, batch "
              f"{evaluator.batch_size}, {evaluator.images_per_batch} image(s) per call, compile "
              f"{'on' if evaluator.compile else 'off'}; {machine(device)}", flush=True)
        with busy.sampling() as u_in1:
            t_in1, _ = timed(lambda: in_process("inproc1"), device)
        print(f"in-process: {t_in1:.1f} s for {n} images", flush=True)
        if gpu:
            torch.cuda.empty_cache()  # the Ray worker plans its batches from the free memory
        with busy.sampling() as u_ray:
            t_ray, manifest = timed(lambda: run(cfg("ray")))
        assert manifest["counts"]["images"] == n, manifest["counts"]
        ray_inner = sum(float(s.get("seconds", 0.0)) for s in manifest["shards"].values())
        print(f"Ray job, 1 worker: {t_ray:.1f} s", flush=True)
        with busy.sampling() as u_in2:
            t_in2, _ = timed(lambda: in_process("inproc2"), device)
        print(f"in-process again: {t_in2:.1f} s", flush=True)
        t_in = (t_in1 + t_in2) / 2
        share_in, share_ray = sum(inner) / (t_in1 + t_in2), ray_inner / t_ray
        util_in, util_ray = _mean(u_in1 + u_in2), _mean(u_ray)
        rows = [["library in-process", f"{t_in:.1f}", f"{n / t_in:.3f}", _pct(util_in), f"{share_in:.2f}"],
                ["Ray job, 1 worker", f"{t_ray:.1f}", f"{n / t_ray:.3f}", _pct(util_ray), f"{share_ray:.2f}"]]
        print()
        print(table(rows, ["path", "seconds", "images/s", "GPU busy (NVML)", "shard evaluation / wall"]))
        if busy.why is None:
            print(f"\nGPU busy: mean torch.cuda.utilization() (NVML, busiest GPU), sampled every {busy.interval:g} s "
                  f"({len(u_in1) + len(u_in2)} samples in-process, {len(u_ray)} during the Ray job)")
        else:
            print(f"\nGPU busy (NVML): not measured ({busy.why}); busy fraction = shard evaluation / wall: the sum "
                  "of the per-shard seconds (Ray: the manifest's) over the wall time")
        print(f"\nthroughput ratio Ray / in-process = {t_in / t_ray:.2f} (target ≥ 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
