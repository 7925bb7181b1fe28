"""The Ray service end to end, on a real cluster bound to 127.0.0.1 (one per test session).

The session fixture starts a head with two fake GPUs and a second node (another raylet on
loopback) with ``cluster/start-local.sh``, connects this process as a driver, and stops exactly the
processes it started with ``cluster/stop-local.sh`` (and checks that none is left).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from service_data import make_shards  # noqa: E402

from unioncam.service import EvalConfig, read_metrics  # noqa: E402
from unioncam.service.runner import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ours(marks: list[str]) -> set[int]:
    """Pids whose command line names one of ``marks`` (an independent check on stop-local.sh)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if cmdline and any(m.encode() in cmdline for m in marks):
                    found.add(int(entry.name))
    return found


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A head with 2 CPUs and 2 fake GPUs plus a second node with 2 CPUs, via cluster/*.sh."""
    state = tmp_path_factory.mktemp("ray-state")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "UNIONCAM_RAY_STATE": str(state),
           "RAY": str(BIN / "ray"), "PYTHON": sys.executable}

    def script(*args: str) -> None:
        done = subprocess.run([str(REPO / "cluster" / args[0]), *args[1:]], env=env, capture_output=True,
                              text=True, timeout=180, cwd=REPO)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    try:
        script("start-local.sh", "--num-cpus=2", "--num-gpus=2")
        script("start-local.sh", "--join", "--num-cpus=2", "--num-gpus=0", '--resources={"second_node": 1}')
        address = (state / "address").read_text().strip()
        ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
        info = {"dashboard": (state / "dashboard").read_text().strip(), "env": env}
        deadline = time.time() + 120  # the job agent comes up some seconds after `ray start` returns
        while (probe := submit(info, ["python", "-c", "pass"], REPO)).returncode != 0 and time.time() < deadline:
            time.sleep(2)
        assert probe.returncode == 0, probe.stderr[-2000:]
        yield info
    finally:
        ray.shutdown()
        if (state / "temp_dir").exists():
            temp = (state / "temp_dir").read_text().strip()
            script("stop-local.sh")
            assert not _ours([temp]), "stop-local.sh left Ray processes behind"
            assert not Path(temp).exists()


def rows_of(out: Path) -> pd.DataFrame:
    return read_metrics(out).to_pandas()


def submit(cluster, entrypoint: list[str], working_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(working_dir),
           "--", *entrypoint]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=600, cwd=REPO)


def job(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return submit(cluster, ["python", "jobs/eval_imagenet.py", *args], REPO)


def test_ray_job_submit_end_to_end_and_idempotent_rerun(cluster, tmp_path):
    shards = make_shards(tmp_path / "shards", n_images=7, shard_size=3, bad=True)
    out = tmp_path / "run"
    args = ["--shards", str(tmp_path / "shards" / "t-{000000..000003}.tar"), "--out", str(out), "--model", "tiny_cnn",
            "--methods", "gradcam,scorecam,unioncam", "--insdel-steps", "8", "--workers", "2",
            "--cpus-per-worker", "1", "--gpus-per-worker", "0", "--progress-interval", "1", "--overlays", "2"]
    first = job(cluster, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "images (100%)" in first.stdout and "report:" in first.stdout
    assert "img/s" in first.stdout or "s/img" in first.stdout

    rows = rows_of(out)
    assert len(shards) == 4 and len(rows) == 10 * 3
    assert not rows.duplicated(["key", "method"]).any()
    per_key = rows.groupby("key")["method"].apply(lambda m: tuple(sorted(m)))
    assert set(per_key) == {("gradcam", "scorecam", "unioncam")} and len(per_key) == 10
    assert set(rows.loc[rows["error"].notna(), "key"]) == {"corrupt", "unlabelled", "badlabel"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"shards_done": 4, "shards_failed": 0, "images": 10, "error_rows": 9}

    # The report's numbers, recomputed here from the Parquet rows.
    summary = pd.read_csv(out / "report" / "summary.csv").set_index("method")
    for method, part in rows[rows["error"].isna()].groupby("method"):
        y, o = part["y"].to_numpy(), part["o"].to_numpy()
        assert summary.loc[method, "average_drop"] == pytest.approx(100 * np.mean(np.maximum(0, y - o) / y))
        assert summary.loc[method, "average_increase"] == pytest.approx(100 * np.mean(y < o))
        assert summary.loc[method, "n"] == 7 and summary.loc[method, "errors"] == 3
    assert (out / "report" / "report.html").is_file() and (out / "report" / "overlays.png").is_file()

    before = {f.name: pq.read_table(f).to_pandas() for f in (out / "metrics").glob("*.parquet")}
    second = job(cluster, *args)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "4 already done" in second.stdout
    after = {f.name: pq.read_table(f).to_pandas() for f in (out / "metrics").glob("*.parquet")}
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name])

    # A failed shard is retried by a rerun: forget one shard's success and delete its rows.
    manifest["shards"]["t-000001"]["status"] = "failed"
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "metrics" / "t-000001.parquet").unlink()
    third = job(cluster, *args)
    assert third.returncode == 0 and "3 already done" in third.stdout
    again = rows_of(out)
    cols = ["key", "method", "target", "y", "o", "insertion_auc", "deletion_auc"]
    pd.testing.assert_frame_equal(again.sort_values(["key", "method"])[cols].reset_index(drop=True),
                                  rows.sort_values(["key", "method"])[cols].reset_index(drop=True))


def test_killed_worker_is_restarted_and_every_image_is_evaluated_once(cluster, tmp_path):
    make_shards(tmp_path / "shards", n_images=6, shard_size=3)
    out = tmp_path / "run"
    # Slow enough to be caught mid-shard: thousands of insertion/deletion steps, one input per forward.
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(out), model="tiny_cnn", methods=["gradcam"],
                     metrics=["insdel"], insdel_steps=1500, batch_size=1, images_per_batch=1, workers=1,
                     cpus_per_worker=1, gpus_per_worker=0, report=False, progress_interval=1).resolved()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(cfg)))
    thread.start()
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and thread.is_alive():
        for marker in (out / "running").glob("*.json"):
            try:
                state = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if state["done"] >= 1:  # one image written, two to go: mid-shard
                victim = state
        time.sleep(0.2)
    assert victim is not None, "never saw a worker mid-shard"
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["counts"] == {"shards_done": 2, "shards_failed": 0, "images": 6, "error_rows": 0}
    redone = result["shards"][victim["shard"]]
    assert redone["worker"]["pid"] != victim["pid"]  # a restarted worker redid the shard
    rows = rows_of(out)
    assert len(rows) == 6 and rows["key"].is_unique and rows["error"].isna().all()
    assert not (out / "running").exists()


def run_four_one_image_shards(tmp_path, **resources) -> dict:
    """Four one-image shards through two workers with ``resources``; returns the run manifest."""
    make_shards(tmp_path / "shards", n_images=4, shard_size=1)
    return run(EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                          methods=["gradcam"], metrics=["ad"], workers=2, report=False, **resources).resolved())


def test_fake_gpus_are_distinct_per_worker(cluster, tmp_path):
    manifest = run_four_one_image_shards(tmp_path, gpus_per_worker=1, cpus_per_worker=1)
    workers = {s["worker"]["pid"]: s["worker"] for s in manifest["shards"].values()}
    assert len(workers) == 2
    gpu_ids = sorted(tuple(w["gpu_ids"]) for w in workers.values())
    assert gpu_ids == [("0",), ("1",)]
    assert all(w["device"] == "cpu" for w in workers.values())  # no CUDA here: fake GPUs, CPU compute


def test_second_node_takes_shards(cluster, tmp_path):
    # Each node has 2 CPUs and each worker takes 2, so the two workers must sit on different nodes.
    manifest = run_four_one_image_shards(tmp_path, gpus_per_worker=0, cpus_per_worker=2)
    nodes = {s["worker"]["node_id"] for s in manifest["shards"].values()}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and nodes <= alive
    assert manifest["counts"]["images"] == 4 and len(rows_of(tmp_path / "run")) == 4
