"""The GPU check's CPU dry run: ``benchmarks/gpu_check.py --device cpu --quick``, so the script made for
a lent GPU machine (docs/performance.md, "GPU check") cannot rot between such loans.

The job part runs on the session's Ray cluster (tests/conftest.py's ``cluster``: its address on
127.0.0.1 and its temporary HOME, which holds the cluster's token), its worker on 1 CPU, no GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from applicable import transformer_only
from conftest import REPO

import unioncam
from unioncam.evaluation import METRICS

JOB_ROWS = ("job: shards done", "job: in-shard throughput", "job: end to end", "job: worker settings",
            "library in-process: throughput", "job / in-process", "gpu_check wall time")
FILES = ("summary.md", "summary.json", "gpu_check.log", "job.log", "pytest.log", "manifest.json")


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_row_with_finite_numbers(cluster, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in cluster["env"].items() if k != "OUT"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
           "--address", cluster["address"], "--out-dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert all((out / name).is_file() for name in FILES), sorted(p.name for p in out.iterdir())

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["check"]: r for r in summary["rows"]}
    assert not [r for r in summary["rows"] if r["status"] == "error"], summary["rows"]
    for r in summary["rows"]:  # every number the table shows is finite
        assert r["value"] is None or math.isfinite(r["value"]), r
    for check in JOB_ROWS:
        assert rows[check]["value"] is not None and rows[check]["value"] > 0, rows.get(check)
    assert rows["job: shards done"]["status"] == "ok" and rows["job: shards done"]["value"] == 2
    assert rows["CUDA tests (pytest -m cuda)"]["status"] == "n/a"  # collected, and skipped without CUDA
    assert "skipped" in rows["CUDA tests (pytest -m cuda)"]["note"]
    for name in unioncam.METHODS.names():  # every registered method, on the device and against the CPU
        if name in transformer_only():  # the check's model is a CNN: said so, not an error
            row = rows[f"method {name}"]
            assert row["status"] == "skipped" and row["note"].startswith(f"skipped: not applicable ({name}: model")
            continue
        row = rows[f"method {name} vs CPU fp32"]
        assert row["value"] is not None and -1 <= row["value"] <= 1, row
    metrics = [c.split(" ")[1].split("+") for c in rows if c.startswith("metric ")]
    for name in METRICS.names():  # every registered metric, and the sanity cascade, timed
        assert any(name in labels for labels in metrics), (name, metrics)
    assert any(labels == ["sanity"] for labels in metrics)
    for entry in (e for e in summary["methods"] if e["method"] not in transformer_only()):
        assert entry["seconds"]["explain"] > 0 and entry["cpu"]["explain_s"] > 0, entry
        assert math.isfinite(entry["cpu"]["d_ad"]) and math.isfinite(entry["cpu"]["d_ai"]), entry

    printed = done.stdout
    assert "| check | value | target | status |" in printed
    assert all(f"| {check} |" in printed for check in rows)
    assert (out / "summary.md").read_text() in printed
