"""The driver's bookkeeping at scale, with stand-in workers (no model, no Ray).

For each run size (shards) and pool size (simulated workers), a stand-in backend answers every
shard at once with a result shaped like a real worker's (counts, source fingerprint, output file
records), so the driver's own loop (``unioncam.service.runner.drive``: the pool, the manifest
records, the progress line, the lock heartbeat) is the only cost. Printed per configuration:

- completions/s the driver sustains, and bytes it writes per completion (records, summaries, lock);
- the driver's peak RSS (each configuration runs in its own process);
- resume over the all-done run: loading the manifest (summary + records), checking every shard's
  outputs (one listing per folder, stamps compared) and every source (one listing of their folder).

Usage: ``python bench_driver_scale.py [--shards 1000,10000,50000] [--workers 1,8,64]
[--s3 1000]`` (``--s3 N``: also on a local moto S3 server with N shards; moto is in the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import machine  # type: ignore[import-not-found]


class StandIn:
    """A backend whose workers answer at once: ``run`` returns a ready reference to ``results[shard]``."""

    def __init__(self, results: dict[str, dict[str, Any]]) -> None:
        self.results = results
        self.ready: list[Any] = []
        self.count = 0

    def start(self) -> int:
        self.count += 1
        return self.count

    def info(self, worker: int) -> tuple[str, Any]:
        ref = ("info", worker)
        self.ready.append(ref)
        return ref

    def run(self, worker: int, shard: str) -> tuple[str, Any]:
        ref = ("run", shard)
        self.ready.append(ref)
        return ref

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        wanted = set(refs)
        found = [r for r in self.ready if r in wanted]
        self.ready = [r for r in self.ready if r not in wanted]
        return found

    def get(self, ref: tuple[str, Any]) -> Any:
        return {"pid": ref[1], "host": "stand-in"} if ref[0] == "info" else dict(self.results[ref[1]])

    def kill(self, worker: int) -> None:
        pass


def one(shards: int, workers: int, root: str) -> dict[str, Any]:
    """One configuration, in this process: the run, then its resume."""
    from unioncam import storage
    from unioncam.data.shards import shard_name
    from unioncam.service import runner
    from unioncam.service.pool import ShardPool
    from unioncam.service.rundir import RunDir, RunLock, RunManifest

    out, src = storage.join(root, "run"), storage.join(root, "src")
    local = not storage.is_uri(root)
    paths = [storage.join(src, f"s-{i:06d}.tar") for i in range(shards)]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the imports (torch, Ray, pyarrow)
    # setup (not timed): the sources, and each shard's output files as a worker would leave them
    where = RunDir(out)

    def put(location: str, data: bytes) -> None:
        if local:  # plain writes: the setup's 3 files per shard need no fsync
            os.makedirs(os.path.dirname(location), exist_ok=True)
            with open(location, "wb") as handle:
                handle.write(data)
        else:
            storage.write_bytes(location, data)

    for p in paths:
        put(p, b"x" * 64)
    results: dict[str, dict[str, Any]] = {}
    for folder in ("metrics", "maps"):
        for p in paths:
            put(where.output(folder, shard_name(p)), b"p" * 32)
    for folder in ("metrics", "maps"):
        stamps = storage.list_stamps(storage.join(out, folder), ".parquet")
        for p in paths:
            loc = where.output(folder, shard_name(p))
            results.setdefault(p, {"images": 1, "rows": 1, "maps": 1, "errors": 0, "seconds": 0.1,
                                   "files": {}, "worker": {"pid": 1, "host": "stand-in"}})
            results[p]["files"][folder] = {"bytes": 32, "sha256": "0" * 64, "stamp": stamps[loc]}
    for p, stamp in storage.list_stamps(src, ".tar").items():
        results[p]["source"] = {"uri": p, "bytes": 64, "stamp": stamp, "sha256": "1" * 64}

    written = [0, 0]  # bytes, writes
    original = storage.write_bytes

    def counting(location: str, data: bytes) -> None:
        written[0] += len(data)
        written[1] += 1
        original(location, data)

    storage.write_bytes = counting  # type: ignore[assignment]
    identity = {"model": "stand-in", "methods": ["gradcam"], "save_maps": True}
    manifest = RunManifest(out, identity)
    manifest.check_shard_set({shard_name(p): p for p in paths})
    manifest.save()
    lock = RunLock(out)
    lock.acquire()
    line = runner.ProgressLine(shards, shards, 0, 0, interval=10.0)
    before = list(written)
    start = time.perf_counter()
    pool = ShardPool(StandIn(results), workers, paths, 600.0, on_start=lambda info: None, no_worker=lambda: "",
                     log=runner.log)
    done = [0]

    def progress() -> tuple[int, int, int, float]:
        return done[0], 0, 0, 0.0

    tally = runner.drive(pool, manifest, lock, line, progress, forget=lambda name: None, interval=5.0)
    manifest.save()  # timed too: it waits for the records still being written
    driving = time.perf_counter() - start
    per_completion = (written[0] - before[0]) / max(tally["done"], 1)
    storage.write_bytes = original  # type: ignore[assignment]

    start = time.perf_counter()  # resume: what the driver does before scheduling, on an all-done run
    again = RunManifest(out, identity)
    again.check_shard_set({shard_name(p): p for p in paths})
    todo, finished = runner.resume_plan(again, out, paths, dict.fromkeys(paths), save_maps=True)
    changed = runner.changed_sources(again, finished, lock)
    resume = time.perf_counter() - start
    lock.release()
    assert not todo and not changed and len(finished) == shards, (len(todo), changed[:2], len(finished))
    return {"shards": shards, "workers": workers, "store": "local" if local else "s3", "done": tally["done"],
            "completions_per_s": tally["done"] / driving, "bytes_per_completion": per_completion,
            "summary_bytes": len(storage.read_bytes(where.manifest)), "resume_s": resume,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "import_rss_mib": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="1000,10000,50000")
    parser.add_argument("--workers", default="1,8,64")
    parser.add_argument("--s3", type=int, default=1000, help="shards of the S3 configuration (0: none)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # N,W,root: one configuration (a child process)
    args = parser.parse_args()
    if args.one:
        n, w, root = args.one.split(",", 2)
        print(json.dumps(one(int(n), int(w), root)))
        return
    print(f"# driver bookkeeping with stand-in workers; {machine('cpu')}")
    rows = []
    configs = [(int(n), int(w), "local") for n in args.shards.split(",") for w in args.workers.split(",")]
    if args.s3:
        configs += [(args.s3, 8, "s3")]
    for n, w, store in configs:
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as tmp:
            if store == "s3":
                root, server = _s3_root(env)
            else:
                root, server = tmp, None
            try:
                done = subprocess.run([sys.executable, __file__, "--one", f"{n},{w},{root}"], env=env,
                                      capture_output=True, text=True, check=True)
            finally:
                if server is not None:
                    server.stop()
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['store']:>5} {r['shards']:>6} shards {r['workers']:>3} workers: {r['completions_per_s']:8.0f} "
              f"completions/s, {r['bytes_per_completion']:7.0f} B written per completion (summary "
              f"{r['summary_bytes'] / 2**20:.1f} MiB), peak RSS {r['peak_rss_mib']:.0f} MiB ({r['import_rss_mib']:.0f} "
              f"after imports), resume "
              f"{r['resume_s']:.1f} s", flush=True)


def _s3_root(env: dict[str, str]) -> tuple[str, Any]:
    """A fresh bucket on a moto server on 127.0.0.1, and the server (stopped by the caller)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                 aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
    return "s3://bench/run-root", server


if __name__ == "__main__":
    main()
