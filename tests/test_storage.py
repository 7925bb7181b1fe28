"""unioncam.storage and everything built on it, against a real S3 endpoint (moto's server on 127.0.0.1).

No Ray here (tests/service/test_s3.py runs the job end to end on the session cluster): shards are written to
and streamed from s3://, a shard's rows and maps are written to s3:// by the evaluator, read back
with read_metrics / read_saliency, reported, verified; faults come from a proxy that answers 500 or
cuts a response short.
"""

from __future__ import annotations

import json
import os
import re
import socket

import numpy as np
import pytest
import torch
from s3_server import SECRET, environment, s3_server
from service_data import make_shards

from unioncam import read_saliency, storage
from unioncam.cli import main as cli
from unioncam.data.shards import expand_shards, iter_samples, write_shards
from unioncam.service import EvalConfig, read_metrics
from unioncam.service.config import ConfigError
from unioncam.service.report import write_report
from unioncam.service.rundir import RunLock, load_manifest, verify_shard
from unioncam.service.worker import ShardEvaluator

BUCKET = "unioncam-test"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def env(s3, monkeypatch):
    """The AWS variables pointing at moto (directly), fast retries."""
    monkeypatch.setattr(storage, "BACKOFF", 0.01)
    s3.faults.match, s3.faults.fail, s3.faults.cut_after = "", 0, 0
    with environment(s3.env()):
        yield s3


@pytest.fixture
def proxied(s3, monkeypatch):
    """Like ``env`` but through the fault proxy (2 retries of ours; pyarrow's client retries too)."""
    monkeypatch.setattr(storage, "BACKOFF", 0.01)
    monkeypatch.setattr(storage, "RETRIES", 2)
    s3.faults.match, s3.faults.fail, s3.faults.cut_after, s3.faults.status = "", 0, 0, 500
    s3.faults.seen.clear()
    with environment(s3.env(through_proxy=True)):
        yield s3


def upload_tree(local_root, uri_root):
    for dirpath, _, files in os.walk(local_root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local_root)
            with open(os.path.join(dirpath, f), "rb") as handle:
                storage.write_bytes(storage.join(uri_root, rel), handle.read())


# -- the storage layer ---------------------------------------------------------------------------
def test_local_write_is_atomic_and_exclusive_create(tmp_path):
    target = str(tmp_path / "a" / "f.bin")
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two" and os.listdir(tmp_path / "a") == ["f.bin"]  # no temporary left
    lock = str(tmp_path / "lock")
    assert storage.create_exclusive(lock, b"x") and not storage.create_exclusive(lock, b"y")
    assert storage.read_bytes(lock) == b"x"


def test_redact_masks_credentials_in_uris():
    assert storage.redact("s3://AKIA:sekret@bucket/x") == "s3://***@bucket/x"
    assert storage.redact("ray://admin:secret@host:10001") == "ray://***@host:10001"
    assert storage.redact("https://h/x?X-Amz-Credential=abc&token=def&n=1") == \
        "https://h/x?X-Amz-Credential=***&token=***&n=1"
    assert storage.redact("/plain/path") == "/plain/path"


def test_an_s3_overwrite_of_the_same_size_within_a_second_moves_the_stamp(env, monkeypatch):
    """On s3:// the stamp is size, seconds and ETag, so a same-size overwrite in the same second (the
    modification time in whole seconds, all S3 reports, would not move) is seen without reading the
    object; the listing's stamps equal the HEAD's; a stamp recorded without the ETag (before, or without
    boto3) still matches on its size and seconds."""
    folder = f"s3://{BUCKET}/stamps"
    a, b = storage.join(folder, "a.parquet"), storage.join(folder, "b.parquet")
    storage.write_bytes(a, b"x" * 100)
    storage.write_bytes(b, b"y" * 7)
    storage.write_bytes(storage.join(folder, "sub", "c.parquet"), b"z")  # not directly in the folder
    before = storage.stamp(a)
    storage.write_bytes(a, b"w" * 100)  # the same size, well within the second
    after = storage.stamp(a)
    head = env.client().head_object(Bucket=BUCKET, Key="stamps/a.parquet")
    assert after == f"100:{int(head['LastModified'].timestamp())}s:{head['ETag'].strip(chr(34))}"
    assert before != after and not storage.stamps_match(before, after)
    assert storage.list_stamps(folder, ".parquet") == {a: after, b: storage.stamp(b)}
    assert storage.list_stamps(f"s3://{BUCKET}/nothing-here") == {}
    assert storage.list_stamps("s3://no-such-bucket-uc/x") == {}
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{BUCKET}/stamps/missing")):
        storage.stamp(storage.join(folder, "missing"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{BUCKET}/stamps/missing")):
        storage.fingerprint(storage.join(folder, "missing"))
    assert storage.fingerprint(a) == {"uri": a, "bytes": 100, "stamp": after, "etag": head["ETag"].strip('"')}
    with pytest.raises(storage.StorageError) as caught:  # a request that cannot succeed is not retried
        storage.stamp(f"s3://{BUCKET}")
    assert "attempts" not in str(caught.value)
    # credentials in the URI sign the requests, decoded as pyarrow decodes them
    signer = storage._s3_client(f"AKID:se%2Fcret@{BUCKET}")._request_signer._credentials
    assert (signer.access_key, signer.secret_key) == ("AKID", "se/cret")

    # without boto3: pyarrow's size and seconds, which match the stamps recorded with the ETag
    monkeypatch.setattr(storage, "_s3_client", lambda netloc: None)
    plain = storage.list_stamps(folder, ".parquet")
    assert plain == {a: storage.stamp(a), b: storage.stamp(b)} and plain[a] == after.rpartition(":")[0]
    assert storage.stamps_match(plain[a], after) and storage.stamps_match(after, plain[a])
    assert not storage.stamps_match("101:" + plain[a].partition(":")[2], after)
    assert storage.stamps_match(None, None) and not storage.stamps_match(None, after)


def test_glob_and_braces_select_the_same_files_on_s3_as_locally(env, tmp_path):
    names = ["val-000000.tar", "val-000001.tar", "val-000002.tar", "train-000000.tar", ".hidden.tar",
             "sub/val-000003.tar", "sub/deep/val-000004.tar", "val-000001.tar.idx"]
    for n in names:
        (tmp_path / "d" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / n).write_bytes(n.encode())
    upload_tree(tmp_path / "d", f"s3://{BUCKET}/glob")
    for pattern in ("*.tar", "val-*.tar", "val-00000[12].tar", "val-{000000..000002}.tar", "*/val-*.tar",
                    "sub/*/*.tar", "?al-000000.tar", "val-{000001..000001}.tar", "*"):
        local = [os.path.relpath(p, tmp_path / "d") for p in expand_shards(str(tmp_path / "d" / pattern))]
        remote = [p.removeprefix(f"s3://{BUCKET}/glob/") for p in expand_shards(f"s3://{BUCKET}/glob/{pattern}")]
        assert remote == local, pattern
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{BUCKET}/glob/nothing-*.tar")):
        expand_shards(f"s3://{BUCKET}/glob/nothing-*.tar")
    with pytest.raises(ValueError, match="reversed brace range"):
        expand_shards(f"s3://{BUCKET}/glob/val-{{000002..000000}}.tar")


def test_bad_locations_get_one_line_errors_without_the_secret(env):
    with pytest.raises(storage.StorageError, match=re.escape("no filesystem for nosuch://")) as info:
        storage.read_bytes("nosuch://bucket/x")
    assert "\n" not in str(info.value)
    with pytest.raises(OSError, match="no-such-bucket-uc") as info:
        storage.list_files("s3://no-such-bucket-uc/x")
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        storage.read_bytes(f"s3://{BUCKET}/missing.tar")
    assert main_error(["report", f"s3://{BUCKET}/no-run"]).startswith("unioncam: error: s3://")


def main_error(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(argv) == 2
    return err.getvalue().strip()


def test_transient_500s_are_retried_and_a_cut_stream_resumes(proxied, tmp_path):
    s3 = proxied
    shard = tmp_path / "s"
    make_shards(shard, 6, 6)
    write_shards_uri = f"s3://{BUCKET}/retry"
    upload_tree(shard, write_shards_uri)
    uri = f"{write_shards_uri}/t-000000.tar"
    local = [(r["key"], r["label"]) for r in iter_samples(str(shard / "t-000000.tar"), (32, 32))]

    s3.faults.match, s3.faults.fail = "retry/t-000000.tar", 2  # the first two requests answer 500
    assert [(r["key"], r["label"]) for r in iter_samples(uri, (32, 32))] == local
    assert s3.faults.seen.count("GET 500") + s3.faults.seen.count("HEAD 500") == 2

    s3.faults.seen.clear()
    s3.faults.match, s3.faults.fail, s3.faults.cut_after = "retry/t-000000.tar", 0, 5000  # drop mid-body once
    assert [(r["key"], r["label"]) for r in iter_samples(uri, (32, 32))] == local
    assert "GET cut" in s3.faults.seen and s3.faults.seen.count("GET ok") >= 1

    s3.faults.match, s3.faults.fail = "retry/t-000000.tar", -1  # never recovers: raised, not recorded
    with pytest.raises(storage.StorageError, match=re.escape(uri)) as info:
        list(iter_samples(uri, (32, 32)))
    assert SECRET not in str(info.value)
    s3.faults.fail = 0


def test_a_shard_on_s3_reads_like_the_same_shard_on_disk(env, tmp_path):
    make_shards(tmp_path / "local", 5, 5, boxes=True)
    write_shards_out = f"s3://{BUCKET}/written"
    from service_data import photo_bytes

    from unioncam.data.shards import Sample

    samples = [Sample(k, d, "jpg", i % 10, {"boxes": [[20.0, 16.0, 76.0, 64.0]]}) for i, (k, d) in
               enumerate(photo_bytes(5))]
    manifest = write_shards(samples, write_shards_out, "t", 5)
    assert storage.is_file(f"{write_shards_out}/manifest.json") and manifest["shards"][0]["count"] == 5
    remote = list(iter_samples(f"{write_shards_out}/t-*.tar", (32, 32)))
    here = list(iter_samples(str(tmp_path / "local" / "t-*.tar"), (32, 32)))
    assert [r["key"] for r in remote] == [r["key"] for r in here]
    for a, b in zip(remote, here, strict=True):
        assert a["label"] == b["label"] and a["boxes"] == b["boxes"]
        assert torch.equal(a["image"], b["image"])
    assert manifest["shards"][0]["sha256"] == storage.sha256(f"{write_shards_out}/t-000000.tar")


def test_evaluator_writes_rows_and_maps_to_s3_and_they_read_back(env, tmp_path):
    s3 = env
    make_shards(tmp_path / "shards", 4, 8, boxes=True, bad=True)
    upload_tree(tmp_path / "shards", f"s3://{BUCKET}/data")
    out = f"s3://{BUCKET}/run-eval"
    cfg = EvalConfig(shards=f"s3://{BUCKET}/data/*.tar", out=out, model="tiny_cnn",
                     methods=["gradcam", "scorecam", "unioncam"], insdel_steps=4).resolved()
    evaluator = ShardEvaluator(cfg, "cpu", run_id="r1")
    result = evaluator.evaluate(f"s3://{BUCKET}/data/t-000000.tar", out)
    assert result["images"] == 7 and result["errors"] == 3 * 3  # 4 good images + corrupt, unlabelled, badlabel
    rows = read_metrics(out).to_pandas()
    assert len(rows) == result["rows"] == 21 and set(rows["shard"]) == {"t-000000"}
    keys, _, maps = read_saliency(out, method="unioncam")
    assert len(keys) == 4 and maps.shape == (4, 64, 64) and np.isfinite(maps).all()
    entry = {"rows": result["rows"], "maps": result["maps"]}
    assert verify_shard(out, "t-000000", "r1", entry, True) is None
    assert "belongs to run 'r1'" in verify_shard(out, "t-000000", "other", entry, True)
    storage.write_text(f"{out}/manifest.json", json.dumps(
        {"run_id": "r1", "config": {"methods": cfg.methods}, "shards": {"t-000000": {"status": "done", **entry}}}))
    written = write_report(out, overlays=2)
    assert written["html"] == f"{out}/report/report.html" and storage.is_file(f"{out}/report/overlays.png")
    summary = storage.read_text(f"{out}/report/summary.csv")
    assert summary.startswith("method,n,errors") and "unioncam,4,3" in summary
    for key, data in s3.all_bytes(BUCKET, "run-eval/").items():
        assert SECRET.encode() not in data and b"AWS_SECRET" not in data, key
    assert load_manifest(out)["run_id"] == "r1"


def test_one_driver_per_run_directory_local_and_s3(env, tmp_path):
    for out in (str(tmp_path / "run"), f"s3://{BUCKET}/run-lock"):
        first = RunLock(out)
        first.acquire()
        with pytest.raises(ConfigError, match="another driver is running"):
            RunLock(out).acquire()
        first.release()
        second = RunLock(out)
        second.acquire()  # free again once released
        second.release()
        # a lock left by a driver that died on this host (kill -9) is taken over
        storage.write_text(storage.join(out, "lock.json"), json.dumps(
            {"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": "x", "heartbeat": 9e18}))
        third = RunLock(out)
        third.acquire()
        assert json.loads(storage.read_text(storage.join(out, "lock.json")))["pid"] == os.getpid()
        third.release()


def test_missing_shards_of_a_range_and_malformed_uris_are_errors(tmp_path):
    for i in (0, 2):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) .* do not exist: .*s-000001\.tar"):
        expand_shards(str(tmp_path / "s-{000000..000002}.tar"))
    for bad in ("s3:/bucket/run", "s3://bucket/run?versionId=1"):
        with pytest.raises(storage.StorageError, match=r"malformed URI|query or fragment"):
            storage.join(bad, "metrics")


def test_a_driver_whose_lock_was_taken_over_stops(tmp_path, monkeypatch):
    from unioncam.service import rundir as lock_module

    out = str(tmp_path / "run")
    lock = RunLock(out)
    lock.acquire()
    storage.write_text(storage.join(out, "lock.json"), json.dumps(
        {"host": "elsewhere", "pid": 1, "since": "x", "heartbeat": 9e18}))  # another driver took it over
    monkeypatch.setattr(lock_module, "LOCK_HEARTBEAT", 0.0)
    with pytest.raises(ConfigError, match="taken by another driver"):
        lock.heartbeat()
    lock.release()  # leaves the other driver's lock alone
    assert json.loads(storage.read_text(storage.join(out, "lock.json")))["host"] == "elsewhere"


def test_access_denied_is_one_line_names_the_uri_and_is_not_retried(proxied):
    s3 = proxied
    storage.write_bytes(f"s3://{BUCKET}/denied/x.bin", b"data")
    s3.faults.match, s3.faults.fail, s3.faults.status = "denied/x.bin", -1, 403
    with pytest.raises(OSError, match=r"cannot open s3://.*denied/x\.bin") as info:
        storage.read_bytes(f"s3://{BUCKET}/denied/x.bin")
    text = str(info.value)
    assert f"s3://{BUCKET}/denied/x.bin" in text and "\n" not in text and SECRET not in text
    assert "attempts" not in text  # permanent: not retried by us


def test_weights_load_from_s3(env, tmp_path):
    from unioncam import load
    from unioncam.models import WeightsError

    local = tmp_path / "tiny.pth"
    torch.save(load("tiny_cnn").model.net.state_dict(), local)
    storage.write_bytes(f"s3://{BUCKET}/weights/tiny.pth", local.read_bytes())
    loaded = load("tiny_cnn", f"s3://{BUCKET}/weights/tiny.pth")
    assert loaded.weights_sha256 == storage.sha256(str(local))
    with pytest.raises(WeightsError, match=f"weights file not found: s3://{BUCKET}/weights/none.pth"):
        load("tiny_cnn", f"s3://{BUCKET}/weights/none.pth")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_verify_shard_rejects_truncated_short_and_missing_files(env, tmp_path, where):
    make_shards(tmp_path / "shards", 3, 3)
    out = str(tmp_path / "run") if where == "local" else f"s3://{BUCKET}/verify-run"
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=out, model="tiny_cnn", methods=["gradcam"],
                     metrics=["ad"]).resolved()
    result = ShardEvaluator(cfg, "cpu", run_id="r").evaluate(str(tmp_path / "shards" / "t-000000.tar"), out)
    entry = {"rows": result["rows"], "maps": result["maps"]}
    assert verify_shard(out, "t-000000", "r", entry, True) is None
    assert "has 3 rows, the manifest recorded 4" in verify_shard(out, "t-000000", "r", {**entry, "rows": 4}, True)
    metrics = storage.join(out, "metrics", "t-000000.parquet")
    storage.write_bytes(metrics, storage.read_bytes(metrics)[:-20])  # cut: no footer
    assert "metrics/t-000000.parquet is damaged" in verify_shard(out, "t-000000", "r", entry, True)
    storage.delete(storage.join(out, "maps", "t-000000.parquet"))
    storage.delete(metrics)
    assert verify_shard(out, "t-000000", "r", entry, True) == "metrics/t-000000.parquet is missing"
