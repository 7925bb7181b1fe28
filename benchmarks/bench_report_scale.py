"""The report at ImageNet scale: a synthetic run of 50,000 images × 7 methods (350,000 rows, 50
shards), maps kept small (8×8) since the report draws only a few overlays; the shards are tiny real
tars so the overlay grid can be drawn. Prints the report's wall time and the peak resident memory
of the process that wrote it (a fresh subprocess, so nothing else is counted).

    python bench_report_scale.py [--images 50000] [--shards 50]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import machine

METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "unioncam", "integrativecam"]


def build(run: str, n_images: int, n_shards: int) -> None:
    """A run directory the job could have written: manifest, metrics and maps per shard, and shards."""
    import pyarrow as pa
    from PIL import Image

    from unioncam.data.shards import Sample, write_shards
    from unioncam.service.results import (
        MapsWriter,
        maps_schema,
        metrics_schema,
        with_provenance,
        write_parquet,
    )

    rng = np.random.default_rng(0)
    per = n_images // n_shards
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    photo = buf.getvalue()
    samples = [Sample(f"img{i:06d}", photo, "png", i % 1000) for i in range(n_images)]
    manifest = write_shards(samples, os.path.join(run, "..", "shards"), "val", per)
    shards: dict[str, dict] = {}
    for s, entry in enumerate(manifest["shards"]):
        name = entry["name"].removesuffix(".tar")
        keys = [f"img{i:06d}" for i in range(s * per, (s + 1) * per)]
        prov = {"run_id": "bench", "model": "vgg16", "shard_path": os.path.abspath(os.path.join(run, "..", "shards",
                                                                                              entry["name"])),
                "input_size": [8, 8], "dataset": "imagenet"}
        rows = []
        for key in keys:
            label = int(key[3:]) % 1000
            y = float(rng.uniform(0.05, 1))
            for m in METHODS:
                rows.append({c: None for c in metrics_schema().names} | {
                    "key": key, "shard": name, "method": m, "target": label, "target_name": f"c{label}",
                    "rank": 1, "label": label, "label_name": f"c{label}", "y": y, "o": float(rng.uniform(0, 1)),
                    "insertion_auc": float(rng.uniform()), "deletion_auc": float(rng.uniform()),
                    "seconds": 0.01, "selected": ("region" if rng.uniform() < 0.8 else "dereg") if m == "unioncam"
                    else None, "beta_den": float(rng.uniform()) if m == "unioncam" else None})
        write_parquet(pa.Table.from_pylist(rows, schema=metrics_schema()), with_provenance(metrics_schema(), prov),
                      os.path.join(run, "metrics", f"{name}.parquet"))
        writer = MapsWriter(with_provenance(maps_schema((8, 8)), {**prov, "map_shape": [8, 8],
                                                                  "map_dtype": "float16"}))
        for key in keys:
            for m in METHODS:
                writer.append({"key": key, "method": m, "rank": 1, "map": rng.random((8, 8)).astype(np.float16)})
        os.makedirs(os.path.join(run, "maps"), exist_ok=True)
        writer.commit(os.path.join(run, "maps", f"{name}.parquet"))
        shards[name] = {"status": "done", "images": per, "rows": len(rows), "maps": len(rows), "errors": 0,
                        "attempts": 1, "path": prov["shard_path"]}
    with open(os.path.join(run, "manifest.json"), "w") as f:
        json.dump({"format": "unioncam-run/1", "run_id": "bench", "shards": shards,
                   "config": {"methods": METHODS, "metrics": ["ad", "ai", "insdel", "epg"]},
                   "counts": {"shards_done": len(shards), "shards_failed": 0, "images": n_images,
                              "error_rows": 0}}, f)


def child(run: str) -> None:
    from unioncam.service.report import write_report

    start = time.perf_counter()
    write_report(run, overlays=4)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        t0 = time.perf_counter()
        build(run, args.images, args.shards)
        built = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--child", run], capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        baseline = subprocess.run([sys.executable, "-c", "import resource, unioncam.service.report; "
                                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                                  capture_output=True, text=True, check=True)
    print(f"machine: {machine('cpu')}")
    print(f"synthetic run: {args.images} images × {len(METHODS)} methods = {args.images * len(METHODS)} rows, "
          f"{args.shards} shards (built in {built:.0f} s)")
    print(f"report: {figures['seconds']:.1f} s, peak RSS {figures['peak_mib']:.0f} MiB "
          f"(importing the report module alone: {float(baseline.stdout):.0f} MiB)")


if __name__ == "__main__":
    main()
