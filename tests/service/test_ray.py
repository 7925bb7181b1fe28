"""The Ray service end to end, on a real cluster bound to 127.0.0.1 (one per test session).

The session fixture ``cluster`` (tests/conftest.py) starts a head with four fake GPUs and a second
node (another raylet on loopback) with ``cluster/start-local.sh`` under a fresh HOME, connects this
process as a driver, and stops exactly the processes it started with ``cluster/stop-local.sh`` (and
checks that none is left).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from service_data import make_shards  # noqa: E402

from unioncam.service import EvalConfig, read_metrics  # noqa: E402
from unioncam.service.runner import run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def rows_of(out: Path) -> pd.DataFrame:
    return read_metrics(out).to_pandas()


def job(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster["submit"](["python", "jobs/eval_imagenet.py", *args], REPO)


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

    # Rescore under torchcam's protocol: a separate run under RUN_DIR/rescore/torchcam, the run only read.
    original = {f.name: f.read_bytes() for f in (out / "metrics").glob("*.parquet")}
    rescore = ["--rescore", str(out), "--protocol", "torchcam", "--workers", "2", "--cpus-per-worker", "1",
               "--gpus-per-worker", "0", "--progress-interval", "1"]
    res = job(cluster, *rescore)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rescored = rows_of(out / "rescore" / "torchcam")
    assert len(rescored) == 30 and not rescored.duplicated(["key", "method"]).any()
    assert {f.name: f.read_bytes() for f in (out / "metrics").glob("*.parquet")} == original
    ok = rescored[rescored["error"].isna()]
    assert len(ok) == 21 and ok["insertion_auc"].notna().all()
    report = (out / "rescore" / "torchcam" / "report" / "report.md").read_text()
    assert "## Metric protocol: torchcam" in report
    assert "4 already done" in job(cluster, *rescore).stdout  # a rerun resumes like any run


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
    # The victim's shard may have just finished when the kill landed (its marker was read a moment
    # before): either way the work after the kill was done by the restarted worker.
    assert {s["worker"]["pid"] for s in result["shards"].values()} - {victim["pid"]}
    rows = rows_of(out)
    assert len(rows) == 6 and rows["key"].is_unique and rows["error"].isna().all()
    assert not (out / "running").exists()


def run_four_one_image_shards(tmp_path, **resources) -> dict:
    """Four one-image shards through two workers with ``resources``; returns the run manifest. Each
    shard takes a few seconds (many insertion/deletion steps), so both workers start and pull shards."""
    make_shards(tmp_path / "shards", n_images=4, shard_size=1)
    return run(EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                          methods=["gradcam"], metrics=["insdel"], insdel_steps=800, batch_size=1, workers=2,
                          report=False, **resources).resolved())


def test_limit_messages_count_only_the_shards_the_limit_takes(cluster, tmp_path, capsys):
    """--limit 2 over shards of 3: one shard is part of the command; a rerun finds it done."""
    make_shards(tmp_path / "shards", n_images=6, shard_size=3)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam"], metrics=["ad"], limit=2, workers=1, cpus_per_worker=1, gpus_per_worker=0,
                     report=False).resolved()
    first = run(cfg)
    out = capsys.readouterr().out
    assert "1 shards (2 images), 0 already done" in out and "done: 1/1 shards, 2 images" in out
    assert first["counts"]["images"] == 2 and len(rows_of(tmp_path / "run")) == 2
    run(cfg)
    out = capsys.readouterr().out
    assert "1 shards (2 images), 1 already done" in out and "done: 1/1 shards, 2 images" in out


def test_one_worker_per_gpu_by_default_each_on_its_own_gpu(cluster, tmp_path):
    """The head has 4 (fake) GPUs: with no --workers / --gpus-per-worker the job starts 4 actors, each
    pinned to a distinct GPU id, and the 8 shards are spread across them."""
    make_shards(tmp_path / "shards", n_images=8, shard_size=1)
    manifest = run(EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"),
                              model="tiny_cnn", methods=["gradcam"], metrics=["ad", "insdel"], insdel_steps=600,
                              batch_size=1, cpus_per_worker=0.25, report=False).resolved())
    started = {w["pid"]: w for w in manifest["workers"]}
    assert len(started) == 4
    assert sorted(tuple(w["gpu_ids"]) for w in started.values()) == [("0",), ("1",), ("2",), ("3",)]
    assert all(w["device"] == "cpu" for w in started.values())  # no CUDA here: fake GPUs, CPU compute
    used = {s["worker"]["pid"] for s in manifest["shards"].values()}
    assert used <= set(started) and len(used) >= 2  # pulled by the workers as each started
    assert manifest["precision"] == "fp16"  # "auto" on GPU workers
    assert manifest["counts"]["shards_done"] == 8


def test_second_node_takes_shards(cluster, tmp_path):
    # Each node has 2 CPUs and each worker takes 2, so the two workers must sit on different nodes.
    manifest = run_four_one_image_shards(tmp_path, gpus_per_worker=0, cpus_per_worker=2)
    nodes = {w["node_id"] for w in manifest["workers"]}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and nodes <= alive
    assert {s["worker"]["node_id"] for s in manifest["shards"].values()} <= nodes
    assert manifest["counts"]["images"] == 4 and len(rows_of(tmp_path / "run")) == 4


def test_a_worker_that_never_starts_is_given_up_and_none_started_is_an_error(cluster, tmp_path, capsys):
    """Workers that wait for resources get no shards: after --start-timeout the job goes on with the
    workers that started, and ends with a one-line error when none did (never a silent hang)."""
    from unioncam.service.runner import WorkerStartError

    @ray.remote(num_cpus=2)
    class Hold:
        def ping(self) -> int:
            return 1

    second = Hold.options(resources={"second_node": 1}).remote()  # the second node's 2 CPUs are taken
    ray.get(second.ping.remote())
    head = None
    try:
        make_shards(tmp_path / "shards", n_images=8, shard_size=1)
        # Slow shards (~3-5 s each: 25 s or more in all), so the run outlasts the timeout.
        base = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), model="tiny_cnn", methods=["gradcam"],
                          metrics=["insdel"], insdel_steps=1500, batch_size=1, cpus_per_worker=2, gpus_per_worker=0,
                          report=False, start_timeout=12)
        manifest = run(replace(base, out=str(tmp_path / "run"), workers=2).resolved())
        assert manifest["counts"]["shards_done"] == 8 and manifest["last_command"]["failed"] == []
        assert manifest["counts"]["error_rows"] == 0, rows_of(tmp_path / "run")["error"].tolist()
        assert len(manifest["workers"]) == 1  # the one that started did every shard
        assert {s["worker"]["pid"] for s in manifest["shards"].values()} == {manifest["workers"][0]["pid"]}
        assert "did not start within 12 s" in capsys.readouterr().out
        head = Hold.remote()  # now the head's 2 CPUs too: no worker can start
        ray.get(head.ping.remote())
        with pytest.raises(WorkerStartError, match=r"no worker started within 3 s: each asks for 0 GPU and 2 CPU"):
            run(replace(base, out=str(tmp_path / "run2"), workers=1, start_timeout=3).resolved())
    finally:
        for actor in (second, head):
            if actor is not None:
                ray.kill(actor)


def listening_sockets(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, program, address, port)`` for every listening TCP socket (IPv4 and IPv6) that ``pids`` hold."""
    listening = {}  # socket inode → (address, port)
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):  # no IPv6 in this kernel
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                # The kernel prints each 32-bit word of the address as a number in host byte order.
                raw = b"".join(struct.pack("=I", int(hex_ip[i:i + 8], 16)) for i in range(0, len(hex_ip), 8))
                listening[int(fields[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):  # gone, or not ours to read
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and int(link[8:-1]) in listening:
                        found.append((pid, Path(program).name, *listening[int(link[8:-1])]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is an IPv6 socket on loopback


def test_every_ray_process_listens_on_loopback_only(cluster):
    """README's promise: the local cluster is on 127.0.0.1, no Ray port on any other interface."""
    sockets = listening_sockets(cluster["processes"]())
    programs = {program for _, program, _, _ in sockets}
    ports = {port for *_, port in sockets}
    # The check saw the cluster: its GCS, dashboard, both raylets and every node's agents.
    assert {int(cluster["address"].rsplit(":", 1)[1]), int(cluster["dashboard"].rsplit(":", 1)[1])} <= ports
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= programs, programs
    assert len({pid for pid, program, _, _ in sockets if program == "raylet"}) == 2
    exposed = sorted((program, address, port) for _, program, address, port in sockets if not is_loopback(address))
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


def test_without_an_address_the_job_starts_its_own_loopback_ray(cluster, tmp_path):
    """A fresh HOME, the session cluster's head running on this host: connect(None) must start a new
    local instance (not join the running one), create the token readable by its owner only, and
    listen on loopback only."""
    from conftest import ray_processes

    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import json, os\n"
        "from unioncam.service.runner import connect\n"
        "connect(None)\n"
        "import ray\n"
        "ctx = ray.get_runtime_context()\n"
        "print(json.dumps({'gcs': ctx.gcs_address, 'temp': ray._private.worker._global_node.get_temp_dir_path()}),"
        " flush=True)\n"
        "import sys; sys.stdin.readline()\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_USAGE_STATS_ENABLED",)}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    proc = subprocess.Popen([str(Path(os.sys.executable)), "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["gcs"] != cluster["address"]  # a new instance, not the running head
        token = home / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        pids = ray_processes([info["temp"]]) | {proc.pid}
        sockets = listening_sockets(pids)
        assert sockets and all(is_loopback(address) for _, _, address, _ in sockets), sockets
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
