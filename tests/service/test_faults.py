"""Faults of the evaluation service and how each ends: error rows, one-line errors, runs left resumable.

- Label targets the model gives zero probability (Y = 0) become error rows; the report still builds.
- A run directory takes new settings while no shard is done, and refuses them, naming the key, after.
- A worker that cannot start (corrupt weights) ends the run in one line, leaves no marker and does not
  lock the settings; a rerun with good weights works.
- Progress never counts the images of shards that failed.
- Ctrl-C on the driver exits 130 with one line on stderr, leaves no marker, and a rerun finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from service_data import make_shards

from unioncam.models import load
from unioncam.service import ConfigError, EvalConfig, read_metrics
from unioncam.service.report import write_report
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator

REPO = Path(__file__).resolve().parents[2]
DEAD_CLASS = 3  # the class whose logit is pushed to -1e4 (labels are i % 10)
Y0 = "Y = 0: the model gives the target class zero probability"


def slow_config(tmp_path: Path, **kw) -> EvalConfig:
    """One worker, thousands of insertion/deletion steps one input per forward: slow enough to be
    caught mid-shard (as tests/service/test_ray.py's killed-worker test)."""
    base = {"shards": str(tmp_path / "shards" / "*.tar"), "out": str(tmp_path / "run"), "model": "tiny_cnn",
            "methods": ["gradcam"], "metrics": ["insdel"], "insdel_steps": 1500, "batch_size": 1,
            "images_per_batch": 1, "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "report": False,
            "progress_interval": 1}
    return EvalConfig(**{**base, **kw}).resolved()


def markers(out: Path) -> list[Path]:
    return sorted((out / "running").glob("*.json")) if (out / "running").exists() else []


def wait_for_marker(out: Path, alive, timeout: float = 300, min_done: int = 0) -> dict:
    """The content of the first ``running/*.json`` marker whose ``done >= min_done``."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        for marker in markers(out):
            try:
                state = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if state.get("done", -1) >= min_done:
                return state
        time.sleep(0.2)
    raise AssertionError(f"never saw a running marker with done >= {min_done}")


# -- 15.6: Y = 0 -----------------------------------------------------------------------------------


def test_label_target_of_zero_probability_is_an_error_row_and_the_report_builds(tmp_path):
    state = {k: v.clone() for k, v in load("tiny_cnn").model.net.state_dict().items()}
    state["classifier.bias"][DEAD_CLASS] = -1e4  # softmax underflows to exactly 0 for this class
    weights = tmp_path / "dead_class.pth"
    torch.save(state, weights)
    shards = make_shards(tmp_path / "shards", n_images=14, shard_size=14)  # class 3 at i = 3 and 13
    assert len(shards) == 1
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     weights=str(weights), methods=["gradcam", "gradcampp"], metrics=["ad", "ai"],
                     target="label").resolved()
    result = ShardEvaluator(cfg).evaluate(str(shards[0]), cfg.out)
    assert (result["images"], result["rows"], result["errors"]) == (14, 28, 4)

    rows = read_metrics(cfg.out).to_pandas()
    assert len(rows) == 28 and sorted(rows["label"].unique()) == list(range(10))
    dead = rows[rows["label"] == DEAD_CLASS]
    alive = rows[rows["label"] != DEAD_CLASS]
    assert len(dead) == 4 and len(alive) == 24
    assert dead["error"].str.startswith(Y0).all(), dead["error"].tolist()
    assert dead["y"].isna().all() and dead["o"].isna().all()
    assert (dead["target"] == DEAD_CLASS).all()
    assert alive["error"].isna().all(), alive["error"].tolist()
    assert (alive["y"] > 0).all() and alive["o"].notna().all()

    paths = write_report(cfg.out, overlays=0)  # no inf Average Drop reaches summarize
    summary = pd.read_csv(paths["summary"]).set_index("method")
    for method in ("gradcam", "gradcampp"):
        assert (summary.loc[method, "n"], summary.loc[method, "errors"]) == (12, 2)
        ok = alive[alive["method"] == method]
        drops = 100 * (ok["y"] - ok["o"]).clip(lower=0) / ok["y"]
        assert summary.loc[method, "average_drop"] == pytest.approx(drops.mean())
        assert 0 <= summary.loc[method, "average_drop"] <= 100
    per_class = pd.read_csv(paths["per_class"])
    assert f"class_{DEAD_CLASS}" not in set(per_class["class"])
    assert "Y = 0" in Path(paths["markdown"]).read_text()


# -- 15.13: settings of a run directory --------------------------------------------------------------


def identity(**kw) -> dict:
    base = {"shards": "x/*.tar", "out": "o", "model": "tiny_cnn", "methods": ["gradcam"], "metrics": ["ad"],
            "insdel_steps": 8}
    return {**EvalConfig(**{**base, **kw}).resolved().identity(), "weights_sha256": None}


def test_new_settings_are_taken_while_no_shard_is_done_and_refused_once_one_is(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = RunManifest(out, identity())
    first.record("t-000000", status="failed", path="x/t-000000.tar", error="worker died: a test")
    run_id = first.run_id
    capsys.readouterr()

    # Only a failed shard: the new settings are taken (and kept by the next save), the run id stays.
    second = RunManifest(out, identity(insdel_steps=16))
    assert "no shard of" in capsys.readouterr().out
    assert second.data["config"] == identity(insdel_steps=16) and second.run_id == run_id
    assert second.check_done("t-000000", save_maps=True) == "failed before"
    second.save()
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["config"]["insdel_steps"] == 16 and on_disk["run_id"] == run_id
    assert on_disk["shards"]["t-000000"]["status"] == "failed"

    # Once a shard is done, other settings are refused, naming the key that changed and both values.
    second.record("t-000001", status="done", path="x/t-000001.tar", images=3, rows=3, maps=0, errors=0)
    before = (tmp_path / "run" / "manifest.json").read_text()
    with pytest.raises(ConfigError) as refused:
        RunManifest(out, identity(insdel_steps=32))
    message = str(refused.value)
    assert "\n" not in message and "other settings (insdel_steps: 16 -> 32); use a new --out" in message
    with pytest.raises(ConfigError, match=r"metrics: \['ad'\] -> \['ad', 'ai'\]"):
        RunManifest(out, identity(insdel_steps=16, metrics=["ad", "ai"]))
    assert (tmp_path / "run" / "manifest.json").read_text() == before  # a refusal writes nothing
    # The same settings are still accepted.
    assert RunManifest(out, identity(insdel_steps=16)).data["shards"]["t-000001"]["status"] == "done"


# -- 15.16 / 15.18: a worker that cannot start ------------------------------------------------------


def test_a_worker_that_cannot_start_fails_in_one_line_and_leaves_the_run_open(cluster, tmp_path, capfd,
                                                                              monkeypatch):
    from unioncam.service import runner
    from unioncam.service.runner import WorkerStartError, run

    make_shards(tmp_path / "shards", n_images=4, shard_size=2)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a weights file, only bytes " * 64)
    out = tmp_path / "run"
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(out), model="tiny_cnn", weights=str(bad),
                     methods=["gradcam"], metrics=["ad"], workers=1, cpus_per_worker=1, gpus_per_worker=0,
                     report=False)
    with pytest.raises(ConfigError, match=r"^cannot read weights file .*corrupt\.pth"):  # the driver checks first
        run(cfg.resolved())
    assert not out.exists()
    # a worker that fails all the same (here: the driver's check skipped) gives its root cause, once
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    monkeypatch.setattr(runner, "check_model", lambda c: (replace(runner.load("tiny_cnn"), weights_sha256=sha), c))
    capfd.readouterr()
    started = time.monotonic()
    with pytest.raises(WorkerStartError) as failed:
        run(cfg.resolved())
    assert time.monotonic() - started < 120  # not the 600 s start timeout
    message = str(failed.value)
    assert message.startswith("a worker could not start: ")
    assert "\n" not in message, message
    assert "cannot read weights file" in message and "corrupt.pth" in message, message
    time.sleep(1)  # what Ray's log monitor would stream from the worker
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert markers(out) == [] and not (out / "lock.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any(s["status"] == "done" for s in manifest["shards"].values())
    assert manifest["counts"]["shards_done"] == 0 and manifest["config"]["weights_sha256"] is not None

    # The failed start did not lock the settings: the same --out with the built-in weights runs.
    capfd.readouterr()
    again = run(replace(cfg, weights=None).resolved())
    assert "taking the new settings (weights_sha256: " in capfd.readouterr().out
    assert again["config"]["weights_sha256"] is None
    assert again["counts"] == {"shards_done": 2, "shards_failed": 0, "images": 4, "error_rows": 0}
    assert len(read_metrics(out)) == 4 and markers(out) == []


def test_a_worker_start_error_is_the_root_cause_without_rays_traceback(tmp_path):
    """The exception Ray raises in the driver when ``ShardWorker.__init__`` fails, built as Ray builds it
    (a RayTaskError of the creation task inside an ActorDiedError): the reason shown is the worker's
    own error, not Ray's colored header and the traceback's ``File ...`` lines and ``^^^`` carets."""
    exceptions = pytest.importorskip("ray.exceptions")
    import traceback

    from unioncam.models import WeightsError
    from unioncam.models.base import read_state_dict
    from unioncam.service.runner import _reason

    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a weights file, only bytes " * 64)
    try:
        read_state_dict(bad)
    except WeightsError as exc:
        cause, tb = exc, traceback.format_exc()
    task = exceptions.RayTaskError("ShardWorker.__init__", tb, cause, proctitle="ray::ShardWorker.__init__",
                                   pid=1234, ip="127.0.0.1", actor_repr="<ShardWorker>", actor_id="ab12")
    died = exceptions.ActorDiedError(task)
    assert died.actor_init_failed and "cannot read weights file" in str(died)
    reason = _reason(died)
    assert "\x1b[" not in reason and 'File "' not in reason and "^^^" not in reason, reason
    assert reason.startswith(f"WeightsError: cannot read weights file {bad} (corrupt or not a state dict)"), reason


# -- 15.17: progress of shards that failed ----------------------------------------------------------


PROGRESS = re.compile(r"^\[unioncam\] (\d+)/(\d+) images \(", re.MULTILINE)


def test_progress_does_not_count_images_of_failed_shards(cluster, tmp_path, capsys):
    from unioncam.service.runner import run

    make_shards(tmp_path / "shards", n_images=6, shard_size=3)
    out = tmp_path / "run"
    cfg = slow_config(tmp_path, max_task_retries=0, max_restarts=1)
    result: dict = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.update(run(cfg))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    try:
        victim = wait_for_marker(out, thread.is_alive, min_done=1)  # one image computed: mid-shard
        os.kill(victim["pid"], signal.SIGKILL)
    finally:
        thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors
    text = capsys.readouterr().out
    counts = result["counts"]
    assert counts["shards_failed"] >= 1, counts  # no retries: the killed worker's shard(s) failed
    assert counts["shards_done"] + counts["shards_failed"] == 2
    assert counts["images"] == 3 * counts["shards_done"]
    lines = PROGRESS.findall(text)
    assert lines, text[-3000:]
    done, total = map(int, lines[-1])
    assert total == 6
    assert done == counts["images"], f"the last progress line says {done}/6, the done shards hold " \
                                     f"{counts['images']} images:\n{text[-3000:]}"
    failed = sorted(n for n, s in result["shards"].items() if s["status"] == "failed")
    assert result["last_command"]["failed"] == failed
    assert f"FAILED shards {failed}" in text
    assert re.search(rf"done: {counts['shards_done']}/2 shards, {counts['images']} images", text)


# -- 15.14: Ctrl-C -------------------------------------------------------------------------------------


def _default_sigint() -> None:
    """A child inherits an ignored SIGINT (and Python then installs no KeyboardInterrupt handler): a
    test process where something set SIG_IGN would make the driver deaf to the Ctrl-C under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_in_one_line_leaves_no_marker_and_a_rerun_finishes(cluster, tmp_path):
    from unioncam.service.runner import run

    make_shards(tmp_path / "shards", n_images=4, shard_size=2)
    out = tmp_path / "run"
    args = ["--shards", str(tmp_path / "shards" / "*.tar"), "--out", str(out), "--model", "tiny_cnn",
            "--methods", "gradcam", "--metrics", "insdel", "--insdel-steps", "4000", "--batch-size", "1",
            "--images-per-batch", "1", "--workers", "1", "--cpus-per-worker", "1", "--gpus-per-worker", "0",
            "--no-report", "--progress-interval", "1", "--address", cluster["address"]]
    env = {**cluster["env"], "PYTHONPATH": str(REPO)}
    stdout, stderr = tmp_path / "driver.out", tmp_path / "driver.err"
    with stdout.open("w") as so, stderr.open("w") as se:
        driver = subprocess.Popen([sys.executable, "jobs/eval_imagenet.py", *args], cwd=REPO, env=env,
                                  stdout=so, stderr=se, start_new_session=True,
                                  preexec_fn=_default_sigint)  # as a terminal's: not whatever this process has
    try:
        wait_for_marker(out, lambda: driver.poll() is None)
        time.sleep(1.0)  # a shard well under way
        assert driver.poll() is None, stderr.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGINT)  # the driver only, as a terminal's Ctrl-C would reach it
        rc = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    err = stderr.read_text()
    assert rc == 130, f"rc {rc}\n{err[-3000:]}"
    interrupted = [line for line in err.splitlines() if line.startswith("unioncam: interrupted")]
    assert len(interrupted) == 1, err[-3000:]
    assert "Traceback" not in err and "retries remaining" not in err, err[-3000:]
    deadline = time.time() + 10  # the killed worker's last write may land a moment after the driver ends
    while markers(out) and time.time() < deadline:
        time.sleep(0.5)
    assert markers(out) == [], [m.read_text() for m in markers(out)]
    assert not (out / "lock.json").exists()

    manifest = run(EvalConfig.from_argv(args[:-2], "imagenet"))  # this process is already connected
    assert manifest["counts"] == {"shards_done": 2, "shards_failed": 0, "images": 4, "error_rows": 0}
    rows = read_metrics(out).to_pandas()
    assert len(rows) == 4 and rows["key"].is_unique and rows["error"].isna().all()
    assert markers(out) == [] and not (out / "running").exists()
