"""A finished run holds exactly its data, whatever happens to it.

- The damage matrix: after a clean run of 3 shards, each damage (a truncated metrics file, a deleted
  maps file, a metrics file of another run, a changed source shard; a shard unreadable on its first
  attempt is in tests/service/test_s3.py) is repaired by a rerun to the clean run's exact rows and map bytes,
  or refused in one line.
- Chaos: workers killed with ``kill -9`` three times at random points, then the driver killed with
  ``kill -9``; a rerun finishes with every (shard, key, method) row exactly once.
- Tar members that are not files (links, devices, FIFOs) each leave an error record.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from service_data import make_shards

from unioncam.data.shards import iter_samples
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.report import write_report
from unioncam.service.results import read_saliency

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["shard", "key", "method", "y", "o", "error"]


def snapshot(out: Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """The run's rows (sorted) and its maps (keys·methods, bytes) for exact comparison."""
    rows = read_metrics(out).to_pandas()[COLUMNS].sort_values(["shard", "key", "method"]).reset_index(drop=True)
    keys, methods, maps = read_saliency(out)
    return rows, [f"{k}/{m}" for k, m in zip(keys, methods, strict=True)], maps


def assert_same(a: tuple, b: tuple) -> None:
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]
    assert a[2].tobytes() == b[2].tobytes()


def test_every_damage_is_repaired_to_the_clean_rows_or_refused(cluster, tmp_path):
    from unioncam.service.runner import run

    shards = make_shards(tmp_path / "shards", n_images=6, shard_size=2, bad=False)
    assert len(shards) == 3

    def cfg(out: Path) -> EvalConfig:
        return EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(out), model="tiny_cnn",
                          methods=["gradcam", "scorecam"], metrics=["ad"], workers=1, cpus_per_worker=1,
                          gpus_per_worker=0, report=False).resolved()

    out = tmp_path / "run"
    assert run(cfg(out))["counts"]["shards_done"] == 3
    clean = snapshot(out)
    assert len(clean[0]) == 12 and clean[0]["error"].isna().all() and len(clean[1]) == 12
    other = tmp_path / "other-run"
    assert run(cfg(other))["counts"]["shards_done"] == 3

    def rerun() -> dict:
        manifest = run(cfg(out))
        assert_same(snapshot(out), clean)
        return manifest

    # 1. A truncated metrics file is redone.
    metrics = out / "metrics" / "t-000000.parquet"
    metrics.write_bytes(metrics.read_bytes()[:100])
    assert rerun()["shards"]["t-000000"]["attempts"] == 2
    # 2. A deleted maps file is redone.
    (out / "maps" / "t-000001.parquet").unlink()
    assert rerun()["shards"]["t-000001"]["attempts"] == 2
    # 3. A metrics file of another run (same settings, same shard) is foreign: redone.
    shutil.copy(other / "metrics" / "t-000002.parquet", out / "metrics" / "t-000002.parquet")
    assert rerun()["shards"]["t-000002"]["attempts"] == 2
    # 3b. Another shard's files of the same run (same row count) copied over a shard's: redone.
    for folder in ("metrics", "maps"):
        shutil.copy(out / folder / "t-000002.parquet", out / folder / "t-000000.parquet")
    assert rerun()["shards"]["t-000000"]["attempts"] == 3
    # 4a. The same shard names in another folder: a run directory holds one shard set; refused.
    make_shards(tmp_path / "elsewhere", n_images=6, shard_size=2)
    with pytest.raises(ConfigError) as refused:
        run(replace(cfg(out), shards=str(tmp_path / "elsewhere" / "*.tar")))
    assert "\n" not in str(refused.value) and "3 from another location" in str(refused.value)
    assert "holds one shard set: use a new --out" in str(refused.value)
    # 4. A source shard whose content changed is refused in one line that names it; nothing is touched.
    original = shards[1].read_bytes()
    make_shards(tmp_path / "changed", n_images=4, shard_size=2, prefix="t")
    shards[1].write_bytes((tmp_path / "changed" / "t-000000.tar").read_bytes())
    before = {p.name: p.read_bytes() for p in (out / "metrics").iterdir()}
    with pytest.raises(ConfigError) as refused:
        run(cfg(out))
    message = str(refused.value)
    assert "\n" not in message and "t-000001.tar changed" in message and "new --out" in message
    assert before == {p.name: p.read_bytes() for p in (out / "metrics").iterdir()}
    shards[1].write_bytes(original)
    assert rerun()["shards"]["t-000001"]["attempts"] == 2  # unchanged again: nothing redone
    # 5. (A shard that must be redone and is unreadable on its first attempt: tests/service/test_s3.py, where a
    # store can refuse a read; locally this process runs as root, which reads any file.)


def test_workers_and_driver_killed_then_a_rerun_has_every_row_once(cluster, tmp_path):
    seed = int(os.environ.get("UNIONCAM_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    make_shards(tmp_path / "shards", n_images=8, shard_size=2)
    out = tmp_path / "run"
    # Slow enough to be caught mid-shard: many insertion/deletion steps, one input per forward.
    args = ["--shards", str(tmp_path / "shards" / "*.tar"), "--out", str(out), "--model", "tiny_cnn",
            "--methods", "gradcam,gradcampp", "--metrics", "ad,insdel", "--insdel-steps", "400",
            "--batch-size", "1", "--images-per-batch", "1", "--workers", "1", "--cpus-per-worker", "1",
            "--gpus-per-worker", "0", "--no-report", "--progress-interval", "1", "--address", cluster["address"]]
    env = {**cluster["env"], "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "jobs/eval_imagenet.py", *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed: list[int] = []
    deadline = time.time() + 400
    try:
        while len(killed) < 3 and time.time() < deadline and driver.poll() is None:
            time.sleep(rng.uniform(0.5, 3.0))  # a random point of the work
            for marker in sorted((out / "running").glob("*.json")) if (out / "running").exists() else []:
                try:
                    pid = json.loads(marker.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
        assert len(killed) == 3, f"seed {seed}: killed {len(killed)} workers before the run ended"
        # Then the driver, once some shards are done and some are not.
        while time.time() < deadline and driver.poll() is None:
            try:
                shards = json.loads((out / "manifest.json").read_text())["shards"]
            except (OSError, ValueError):
                shards = {}
            if sum(s.get("status") == "done" for s in shards.values()) >= 1:
                break
            time.sleep(0.3)
        assert driver.poll() is None, f"seed {seed}: the driver ended before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert sum(s["status"] == "done" for s in shards.values()) < 4, f"seed {seed}: nothing left to resume"

    # The rerun (a new driver, the old one's lock is stale) finishes the run.
    from unioncam.service.runner import run

    manifest = run(EvalConfig.from_argv(args[:-2], "imagenet"))  # this process is already connected
    assert manifest["counts"] == {"shards_done": 4, "shards_failed": 0, "images": 8, "error_rows": 0}, seed
    rows = read_metrics(out).to_pandas()
    counts = rows.groupby(["shard", "key", "method"]).size()
    assert len(counts) == 8 * 2 and (counts == 1).all(), f"seed {seed}: lost or duplicated rows"
    assert rows["error"].isna().all()
    assert not (out / "lock.json").exists() and not (out / "running").exists()
    summary = pd.read_csv(write_report(out, overlays=0)["summary"]).set_index("method")
    for method, part in rows.groupby("method"):
        y, o = part["y"].to_numpy(), part["o"].to_numpy()
        assert summary.loc[method, "n"] == 8
        assert summary.loc[method, "average_drop"] == pytest.approx(100 * np.mean(np.maximum(0, y - o) / y))


def test_members_that_are_not_files_each_leave_an_error_record(tmp_path):
    """Links, devices and FIFOs are never followed or read; each is reported, nothing vanishes."""
    photo = (make_shards(tmp_path / "src", n_images=1, shard_size=1)[0])
    with tarfile.open(photo) as tar:
        good = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    path = tmp_path / "odd.tar"
    kinds = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
             "fifo": tarfile.FIFOTYPE}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for stem, kind in kinds.items():
            info = tarfile.TarInfo(f"{stem}.jpg")
            info.type = kind
            info.linkname = next(iter(good)) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
    records = list(iter_samples(str(path), size=(32, 32)))
    assert len(records) == 1 + len(kinds)
    assert "error" not in records[0]
    errors = {r["key"]: r["error"] for r in records[1:]}
    assert set(errors) == set(kinds)
    assert "is a link" in errors["sym"] and "is a link" in errors["hard"]
    for stem in ("chr", "blk", "fifo"):
        assert "special file" in errors[stem]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _photo_members(tmp_path: Path) -> dict[str, bytes]:
    shard = make_shards(tmp_path / "src", n_images=1, shard_size=1)[0]
    with tarfile.open(shard) as tar:
        return {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_key_that_comes_back_later_is_an_error_record_of_its_own(tmp_path):
    """``a.jpg a.cls b.jpg b.cls a.jpg a.cls``: not two samples ``a`` (duplicate rows), but ``a``, ``b``
    and an error record ``a:repeat1``."""
    parts = _photo_members(tmp_path)
    path = _tar(tmp_path / "again.tar", [("a.jpg", parts["jpg"]), ("a.cls", b"1"), ("b.jpg", parts["jpg"]),
                                         ("b.cls", b"2"), ("a.jpg", parts["jpg"]), ("a.cls", b"3")])
    records = list(iter_samples(str(path), size=(32, 32)))
    assert [r["key"] for r in records] == ["a", "b", "a:repeat1"]
    assert records[0]["label"] == 1 and "error" not in records[1]
    assert "appears again after other samples" in records[2]["error"]


def test_a_zeroed_member_header_is_damage_not_the_end_of_the_archive(tmp_path):
    """One zero block where sample 3's header was (a shard without a dataset manifest): tarfile would
    stop there as at a proper end; the reader reports the damage instead."""
    parts = _photo_members(tmp_path)
    members = [(f"s{i}.{ext}", data) for i in range(4) for ext, data in (("jpg", parts["jpg"]), ("cls", b"1"))]
    path = _tar(tmp_path / "zeroed.tar", members)
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        third = next(m for m in tar.getmembers() if m.name == "s2.jpg").offset
    raw[third:third + 512] = bytes(512)
    path.write_bytes(bytes(raw))
    records = list(iter_samples(str(path), size=(32, 32)))
    # s1 may have had more members after the zeroed header: the sample the damage cut gets the error
    assert [r["key"] for r in records] == ["s0", "s1"] and "error" not in records[0]
    assert f"zeroed member header at byte {third}" in records[1]["error"]
    # a proper end (two zero blocks, then the record padding) is still the end
    assert len(list(iter_samples(str(_tar(tmp_path / "ok.tar", members)), size=(32, 32)))) == 4


def test_metadata_with_a_lone_surrogate_is_an_error_row_not_a_failed_shard(tmp_path):
    from unioncam.service.worker import ShardEvaluator

    parts = _photo_members(tmp_path)
    bad_json = b'{"error": "x\\ud800y"}'
    shard = _tar(tmp_path / "shards" / "t-000000.tar", [("a.jpg", parts["jpg"]), ("a.cls", b"1"), ("a.json", bad_json),
                                                        ("b.jpg", parts["jpg"]), ("b.cls", b"2")])
    cfg = EvalConfig(shards=str(shard), out=str(tmp_path / "run"), model="tiny_cnn", methods=["gradcam"],
                     metrics=["ad"], report=False).resolved()
    result = ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(shard), cfg.out)
    assert result["rows"] == 2 and result["errors"] == 1
    rows = read_metrics(cfg.out).to_pandas().set_index("key")
    assert "not valid Unicode" in rows.loc["a", "error"] and pd.isna(rows.loc["b", "error"])
