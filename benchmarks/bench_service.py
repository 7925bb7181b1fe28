"""Service overhead: the Ray job with one worker against the library in-process, same images and work.

    python benchmarks/bench_service.py [--methods unioncam] [--metrics ad,ai]

In-process: :class:`unioncam.service.worker.ShardEvaluator` over every sample shard in this process
(model loaded once, not timed). Ray: ``unioncam.service.runner.run`` with one worker, timed from the
call to its return, so it pays for starting Ray, the actor, its model load, scheduling, Parquet and
the manifest. The ratio of throughputs (in-process time / Ray time) is the service's efficiency.
The in-process run goes first and last and its mean is used, so drift hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import machine, table, timed

from unioncam.data.sample import write_sample_shards
from unioncam.data.shards import expand_shards
from unioncam.service.config import EvalConfig
from unioncam.service.runner import run
from unioncam.service.worker import ShardEvaluator


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="unioncam")
    p.add_argument("--metrics", default="ad,ai")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="unioncam-bench-"))
    try:
        write_sample_shards(tmp / "shards")
        shards = expand_shards(str(tmp / "shards" / "imagenet" / "*.tar"))

        def cfg(out: str) -> EvalConfig:
            return EvalConfig(shards=str(tmp / "shards" / "imagenet" / "*.tar"), out=str(tmp / out),
                              model="efficientnet_lite0", methods=args.methods.split(","),
                              metrics=args.metrics.split(","), workers=1, report=False).resolved()

        evaluator = ShardEvaluator(cfg("inproc"))
        n = 0

        def in_process(out: str) -> None:
            nonlocal n
            n = sum(evaluator.evaluate(s, tmp / out)["images"] for s in shards)

        print(f"# bench_service: {args.methods} on the {len(shards)}-shard sample, efficientnet_lite0; {machine()}")
        t_in1, _ = timed(lambda: in_process("inproc1"))
        print(f"in-process: {t_in1:.1f} s for {n} images", flush=True)
        t_ray, manifest = timed(lambda: run(cfg("ray")))
        assert manifest["counts"]["images"] == n, manifest["counts"]
        print(f"Ray job, 1 worker: {t_ray:.1f} s", flush=True)
        t_in2, _ = timed(lambda: in_process("inproc2"))
        print(f"in-process again: {t_in2:.1f} s", flush=True)
        t_in = (t_in1 + t_in2) / 2
        rows = [["library in-process", f"{t_in:.1f}", f"{n / t_in:.3f}"],
                ["Ray job, 1 worker", f"{t_ray:.1f}", f"{n / t_ray:.3f}"]]
        print()
        print(table(rows, ["path", "seconds", "images/s"]))
        print(f"\nthroughput ratio Ray / in-process = {t_in / t_ray:.2f} (target ≥ 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
