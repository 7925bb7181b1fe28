"""The real job's cost per shard as the run grows: one-image shards, tiny_cnn, Grad-CAM, AD/AI.

    python benchmarks/bench_job_scale.py [--shards 300,3000] [--workers 1]

For each run size N, N one-image shards (the sample's real photos, repeated) are evaluated by
``unioncam.service.runner.run`` on a local Ray cluster (127.0.0.1) with ``--workers`` workers on CPU,
timed from the call to its return (Ray's start, the worker's model load, scheduling, Parquet and the
manifest included), then run again over the finished run (the resume: nothing to do). Printed per N:

- wall seconds per shard, and its ratio to the smallest run's (the driver's cost does not grow with
  the run when it stays near 1.0);
- seconds inside the worker per shard (the manifest records' ``seconds``: decode, explain, score,
  write), and of those the fixed part: the in-worker seconds less the same image's compute measured
  in-process (the model's forwards), i.e. what a shard costs beyond its images;
- the rerun's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import machine, table

from unioncam.data.sample import sample_samples
from unioncam.data.shards import Sample, write_shards
from unioncam.service.config import EvalConfig
from unioncam.service.rundir import load_manifest
from unioncam.service.runner import run
from unioncam.service.worker import ShardEvaluator


def one_image_shards(out: Path, n: int) -> str:
    """``n`` one-image shards of the ImageNet sample's photos (repeated, keys made unique)."""
    base = list(sample_samples("imagenet"))

    def samples() -> Iterator[Sample]:
        for i in range(n):
            s = base[i % len(base)]
            yield Sample(f"{s.key}_{i}", s.image, s.ext, s.label, s.meta)

    write_shards(samples(), out, "one", 1)
    return str(out / "one-*.tar")


def config(shards: str, out: Path, workers: int) -> EvalConfig:
    return EvalConfig(shards=shards, out=str(out), model="tiny_cnn", methods=["gradcam"], metrics=["ad", "ai"],
                      workers=workers, report=False, progress_interval=60.0).resolved()


def compute_per_image(shards: str, root: Path) -> float:
    """In-process seconds per image of the work itself: explain + score one decoded image (no I/O)."""
    from unioncam.data.shards import expand_shards, iter_samples
    from unioncam.service.results import MapsWriter, maps_schema

    cfg = config(shards, root / "inproc", 1)
    ev = ShardEvaluator(cfg, "cpu", run_id="bench")
    records = [r for p in expand_shards(shards)[:40] for r in iter_samples(p, ev.size)]
    rows: list[dict] = []
    maps = MapsWriter(maps_schema(ev.size))
    ev._evaluate_batch(records[:1], rows, maps)  # warm-up
    start = time.perf_counter()
    for r in records[1:]:
        ev._evaluate_batch([r], rows, maps)
    maps.discard()
    return (time.perf_counter() - start) / (len(records) - 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="300,3000", help="run sizes (one image per shard)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    sizes = [int(s) for s in args.shards.split(",")]
    print(machine("cpu"))
    root = Path(tempfile.mkdtemp(prefix="unioncam-bench-job-"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=max(2, args.workers),
             log_to_driver=False)
    results = []
    try:
        per_image = None
        for n in sizes:
            shards = one_image_shards(root / f"shards-{n}", n)
            if per_image is None:
                per_image = compute_per_image(shards, root)
            out = root / f"run-{n}"
            start = time.perf_counter()
            manifest = run(config(shards, out, args.workers))
            wall = time.perf_counter() - start
            records = load_manifest(str(out))["shards"]
            inside = sum(float(r.get("seconds", 0.0)) for r in records.values())
            done = sum(r.get("status") == "done" for r in records.values())
            start = time.perf_counter()
            run(config(shards, out, args.workers))
            rerun = time.perf_counter() - start
            results.append({"shards": n, "done": done, "failed": manifest["counts"]["shards_failed"], "wall": wall,
                            "inside": inside, "rerun": rerun})
            shutil.rmtree(root / f"shards-{n}", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    assert per_image is not None
    first = results[0]["wall"] / results[0]["shards"]
    rows = [[r["shards"], r["done"], f"{r['wall']:.1f}", f"{r['wall'] / r['shards']:.4f}",
             f"{r['wall'] / r['shards'] / first:.2f}", f"{r['inside'] / r['shards']:.4f}",
             f"{r['inside'] / r['shards'] - per_image:.4f}", f"{r['rerun']:.1f}"] for r in results]
    print(f"in-process compute of one image (explain + AD/AI forwards): {per_image:.4f} s")
    print(table(rows, ["shards", "done", "wall s", "wall s/shard", "× smallest", "in-worker s/shard",
                       "fixed s/shard", "rerun s"]))
    print(json.dumps(results))
    return 0 if all(r["done"] == r["shards"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
