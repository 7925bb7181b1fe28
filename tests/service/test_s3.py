"""The Ray job end to end on object storage: shards on s3://, RUN_DIR on s3://, a real S3 endpoint.

moto's server runs on 127.0.0.1 behind a fault proxy (tests/s3_server.py); the job is submitted with
``ray job submit`` to the session cluster (tests/conftest.py), its workers get the standard AWS
variables through the job's ``runtime_env`` (one of the two ways cluster/README.md documents). The
sample shards are written to the bucket by ``unioncam shards sample --out s3://...``.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from s3_server import SECRET, environment, s3_server

from unioncam import read_saliency, storage
from unioncam.cli import main as cli
from unioncam.service import read_metrics

BUCKET = "unioncam-e2e"
REPO_ENTRY = ["python", "jobs/eval_imagenet.py"]
ARGS = ["--model", "tiny_cnn", "--methods", "gradcam,unioncam", "--metrics", "ad,ai,insdel", "--insdel-steps", "4",
        "--workers", "2", "--cpus-per-worker", "1", "--gpus-per-worker", "0", "--overlays", "2",
        "--progress-interval", "2"]


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        with environment(server.env(through_proxy=True)):
            assert cli(["shards", "sample", "--out", f"s3://{BUCKET}/sample", "--shard-size", "4"]) == 0
            yield server


def job(cluster, s3, out: str) -> subprocess.CompletedProcess[str]:
    from conftest import BIN, REPO

    runtime_env = json.dumps({"env_vars": s3.env(through_proxy=True)})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", runtime_env, "--", *REPO_ENTRY,
           "--shards", f"s3://{BUCKET}/sample/imagenet/sample-imagenet-*.tar", "--out", out, *ARGS]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=600, cwd=REPO)


def rows_of(out: str):
    df = read_metrics(out).to_pandas()
    return df.sort_values(["key", "method"]).reset_index(drop=True)


def test_job_on_s3_end_to_end_rerun_and_no_secret(cluster, s3):
    out = f"s3://{BUCKET}/run"
    first = job(cluster, s3, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with environment(s3.env()):
        rows = rows_of(out)
        assert len(rows) == 8 * 2 and rows["error"].isna().all() and rows.groupby(["key", "method"]).size().max() == 1
        assert rows["y"].notna().all() and rows["insertion_auc"].between(0, 1).all()
        keys, _methods, maps = read_saliency(out, method="unioncam")
        assert len(keys) == 8 and maps.shape == (8, 64, 64)
        for name in ("summary.csv", "per_class.csv", "report.md", "report.html", "ad_ai.png", "overlays.png"):
            assert storage.is_file(f"{out}/report/{name}"), name
        manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
        assert manifest["counts"] == {"shards_done": 2, "shards_failed": 0, "images": 8, "error_rows": 0}
        assert not storage.is_file(f"{out}/lock.json")  # released at the end
        assert cli(["verify", out]) == 0

    second = job(cluster, s3, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 shards (8 images), 2 already done" in second.stdout
    with environment(s3.env()):
        again = rows_of(out)
        assert again[["key", "method", "y", "o"]].equals(rows[["key", "method", "y", "o"]])  # same rows, no duplicates
        everything = s3.all_bytes(BUCKET, "run/")
    assert all(k.startswith("run/") for k in everything)
    for key, data in everything.items():
        assert SECRET.encode() not in data, key
    for text in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert SECRET not in text


@pytest.mark.slow  # ~70 s: our retries × pyarrow's own, then two more jobs
def test_a_shard_that_stays_unreadable_fails_and_a_rerun_completes_it(cluster, s3):
    out = f"s3://{BUCKET}/run-faults"
    s3.faults.match, s3.faults.fail = "sample/imagenet/sample-imagenet-000001.tar", -1
    try:
        broken = job(cluster, s3, out)
    finally:
        s3.faults.fail = 0
    assert broken.returncode != 0
    assert "FAILED shards ['sample-imagenet-000001']" in broken.stdout, broken.stdout[-3000:]
    with environment(s3.env()):
        manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
        entry = manifest["shards"]["sample-imagenet-000001"]
        assert entry["status"] == "failed" and "s3://" in entry["error"] and SECRET not in entry["error"]
        assert not storage.is_file(f"{out}/metrics/sample-imagenet-000001.parquet")  # nothing half-done
        assert len(rows_of(out)) == 4 * 2

    healed = job(cluster, s3, out)
    assert healed.returncode == 0, healed.stdout[-3000:] + healed.stderr[-3000:]
    assert "1 already done" in healed.stdout
    with environment(s3.env()):
        rows = rows_of(out)
        assert len(rows) == 8 * 2 and rows.groupby(["key", "method"]).size().max() == 1
        assert rows["error"].isna().all()


@pytest.mark.slow  # four jobs
def test_a_redone_shard_unreadable_on_its_first_attempt_is_completed_to_the_clean_rows(cluster, s3):
    """The damage matrix's last case (tests/service/test_damage_and_crashes.py has the others): after a clean run, a
    shard must be redone (its metrics file is gone) and the store refuses its first read: that rerun
    records it failed, the next one restores exactly the clean rows and maps."""
    out = f"s3://{BUCKET}/run-damage"
    assert job(cluster, s3, out).returncode == 0
    with environment(s3.env()):
        clean, clean_maps = rows_of(out), read_saliency(out)
        storage.delete(f"{out}/metrics/sample-imagenet-000000.parquet")
    s3.faults.match, s3.faults.status, s3.faults.fail = "sample/imagenet/sample-imagenet-000000.tar", 403, -1
    try:
        refused = job(cluster, s3, out)
    finally:
        s3.faults.fail, s3.faults.status = 0, 500
    assert refused.returncode == 1 and "FAILED shards ['sample-imagenet-000000']" in refused.stdout
    healed = job(cluster, s3, out)
    assert healed.returncode == 0, healed.stdout[-3000:] + healed.stderr[-3000:]
    with environment(s3.env()):
        rows, maps = rows_of(out), read_saliency(out)
    cols = ["shard", "key", "method", "y", "o", "insertion_auc", "deletion_auc", "error"]
    assert rows[cols].equals(clean[cols])
    assert maps[0] == clean_maps[0] and maps[1] == clean_maps[1] and maps[2].tobytes() == clean_maps[2].tobytes()
    with environment(s3.env()):
        assert not storage.list_files(f"{out}/running")  # the failed attempt left no marker
    # A store that fails only the first reads (500s): retried within the same rerun, which completes.
    with environment(s3.env()):
        storage.delete(f"{out}/metrics/sample-imagenet-000001.parquet")
    s3.faults.match, s3.faults.status, s3.faults.fail = "sample/imagenet/sample-imagenet-000001.tar", 500, 2
    try:
        retried = job(cluster, s3, out)
    finally:
        s3.faults.fail = 0
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
    with environment(s3.env()):
        assert rows_of(out)[cols].equals(clean[cols])
