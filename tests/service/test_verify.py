"""A run's outputs are what was written, and a run says when it is not finished.

- A changed byte in a maps, metrics or sanity file is refused by ``unioncam verify``, by resume
  (which redoes the shard) and by every reader, in one line naming the file.
- ``unioncam verify`` names the shards of the run's shard set that are not done and a lock left
  behind (exit 3), and damage (exit 1).
- Every reader checks the schema version; every file written honours the umask.
- A rescore of an unfinished run says what it skipped and is extended once the run is complete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from service_data import make_shards

from unioncam.cli import main as cli
from unioncam.service import EvalConfig, read_metrics
from unioncam.service.dataset import SaliencyDataset
from unioncam.service.report import write_report
from unioncam.service.results import (
    RunFileError,
    metrics_schema,
    read_saliency,
    with_provenance,
    write_parquet,
)
from unioncam.service.runner import RunManifest
from unioncam.service.worker import ShardEvaluator


def finished_run(tmp_path: Path, n_shards: int = 1, done: int = 1, **kw: object) -> tuple[EvalConfig, RunManifest,
                                                                                          list[Path]]:
    """A run of ``n_shards`` two-image shards of tiny_cnn of which the first ``done`` are finished, and its
    manifest as the runner writes it (the shard set recorded)."""
    shards = make_shards(tmp_path / "shards", n_images=2 * n_shards, shard_size=2)
    cfg = EvalConfig(shards=str(tmp_path / "shards" / "*.tar"), out=str(tmp_path / "run"), model="tiny_cnn",
                     methods=["gradcam", "scorecam"], metrics=["ad"], report=False, **kw).resolved()  # type: ignore[arg-type]
    manifest = RunManifest(str(cfg.out), {**cfg.identity(), "weights_sha256": None})
    manifest.check_shard_set({p.stem: str(p) for p in shards})
    ev = ShardEvaluator(cfg, "cpu", run_id=manifest.run_id)
    for shard in shards[:done]:
        manifest.record(shard.stem, status="done", path=str(shard), **ev.evaluate(str(shard), str(cfg.out)))
    return cfg, manifest, shards


def page_offsets(path: Path, column: str) -> list[int]:
    """Byte offsets in the bodies of ``column``'s pages: the last bytes before each page's end (a page
    header, whose statistics no reader uses, comes first), and for long pages a quarter and a half in."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.to_arrow_schema().get_field_index(column)
    offsets = []
    for g in range(meta.num_row_groups):
        chunk = meta.row_group(g).column(index)
        first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        start, end = chunk.data_page_offset, first + chunk.total_compressed_size  # the data pages
        offsets += [end - 1] + ([start - 1] if chunk.has_dictionary_page else [])  # the dictionary page's end
        if end - start > 4096:
            offsets += [start + (end - start) // 4, (start + end) // 2]
    return offsets


def verify(run: str, *flags: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli(["verify", run, *flags])
    return rc, capsys.readouterr().out


def test_a_changed_byte_is_refused_by_verify_resume_and_the_readers(tmp_path, capsys):
    cfg, manifest, _ = finished_run(tmp_path)
    out = Path(str(cfg.out))
    assert verify(str(out), capsys=capsys)[0] == 0
    for folder, column, read in (("maps", "map", lambda: read_saliency(out)),
                                 ("metrics", "y", lambda: read_metrics(out))):
        path = out / folder / "t-000000.parquet"
        clean = path.read_bytes()
        for offset in page_offsets(path, column):
            damaged = bytearray(clean)
            damaged[offset] ^= 0x5A
            path.write_bytes(bytes(damaged))
            rc, text = verify(str(out), capsys=capsys)
            assert rc == 1 and f"BAD  t-000000  {folder}/t-000000.parquet changed after it was written" in text, text
            why = manifest.check_done("t-000000", save_maps=True)  # resume's test: the shard is redone
            assert why is not None and f"{folder}/t-000000.parquet" in why
            with pytest.raises(RunFileError, match=rf"{folder}/t-000000\.parquet changed after it was written") \
                    as caught:  # the readers check the stamps as verify does
                read()
            assert "\n" not in str(caught.value)
            stat = os.stat(path)  # a change that keeps the size and modification time: --deep hashes every byte
            os.utime(path, ns=(stat.st_atime_ns, int(manifest.data["shards"]["t-000000"]["files"][folder]
                                                     ["stamp"].split(":")[1])))
            assert verify(str(out), capsys=capsys)[0] == 0  # the stamp is the one recorded: not read
            rc, text = verify(str(out), "--deep", capsys=capsys)
            assert rc == 1 and f"{folder}/t-000000.parquet changed after it was written" in text
            assert "must be deleted first" in text
            with pytest.raises(RunFileError, match=r"is damaged .*: delete it and rerun the job"):  # page checksums
                read()
            assert manifest.check_done("t-000000", save_maps=True) is None  # the stamp is unchanged ...
            moved = out / "moved.bin"
            path.rename(moved)
            assert f"{folder}/t-000000.parquet is missing" in str(manifest.check_done("t-000000", save_maps=True))
            moved.rename(path)  # ... so, as the messages say, a deleted file is what makes a rerun redo it
        path.write_bytes(clean)
    assert verify(str(out), "--deep", capsys=capsys)[0] == 0  # restored: the same bytes, a new stamp


def test_verify_names_the_shards_not_done_and_a_lock_left_behind(tmp_path, capsys):
    cfg, manifest, shards = finished_run(tmp_path, n_shards=3, done=1)
    manifest.record("t-000001", status="failed", path=str(shards[1]), error="worker died: killed")
    out = str(cfg.out)
    rc, text = verify(out, capsys=capsys)
    assert rc == 3, text
    assert "TODO t-000001  failed: worker died: killed" in text and "TODO t-000002  not started" in text
    assert "3 shards in its shard set, 1 done, 0 problem(s), 2 not done" in text
    lock = Path(out) / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 7, "since": "then", "heartbeat": 0}))
    rc, text = verify(out, capsys=capsys)
    assert rc == 3 and "LOCK lock.json was left behind by a driver that is gone" in text and "a lock is present" in text
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now",
                                "heartbeat": time.time()}))
    assert "the run is in progress" in verify(out, capsys=capsys)[1]
    lock.unlink()
    (Path(out) / "metrics" / "t-000000.parquet").unlink()  # damage wins over unfinished: exit 1
    assert verify(out, capsys=capsys)[0] == 1


def test_verify_counts_only_the_shards_a_limited_run_takes(tmp_path, capsys):
    cfg, manifest, _ = finished_run(tmp_path, n_shards=3, done=1, limit=4)  # 2 images a shard: 2 shards taken
    manifest.data["planned"] = ["t-000000", "t-000001"]  # as the runner records it
    manifest.save()
    rc, text = verify(str(cfg.out), capsys=capsys)
    assert rc == 3 and "TODO t-000001  not started" in text and "t-000002" not in text.split("run ")[0]
    assert "1 not done, 1 not evaluated (--limit 4)" in text


def test_every_reader_checks_the_schema_version(tmp_path, capsys):
    cfg, manifest, _ = finished_run(tmp_path)
    out = Path(str(cfg.out))

    def rewrite(folder: str, table: pa.Table, schema: pa.Schema) -> None:
        """Write ``folder``'s file as the run's own (its record in the manifest updated)."""
        record = write_parquet(table, schema, str(out / folder / "t-000000.parquet"))
        entry = {k: v for k, v in manifest.data["shards"]["t-000000"].items() if k != "attempts"}
        manifest.record("t-000000", **{**entry, "files": {**entry["files"], folder: record}})

    readers = {"metrics": (lambda: read_metrics(out), lambda: SaliencyDataset(out)),
               "maps": (lambda: read_saliency(out), lambda: SaliencyDataset(out)[0])}
    for folder, reads in readers.items():
        path = out / folder / "t-000000.parquet"
        table = pq.read_table(path)
        meta = {**table.schema.metadata, b"unioncam.schema_version": b"2"}
        rewrite(folder, table, table.schema.with_metadata(meta))
        for read in reads:
            with pytest.raises(RunFileError, match=rf"{folder}/t-000000\.parquet has schema version 2; unioncam .* "
                                                   r"reads version 3: rerun the job into a new --out"):
                read()
        rc, text = verify(str(out), "--deep", capsys=capsys)  # verify and a resume: the fact, not the advice
        assert rc == 1 and f"{folder}/t-000000.parquet has schema version 2; unioncam" in text
        assert "rerun the job into a new --out" not in text
        rewrite(folder, table, table.schema)  # back to version 3, as it was
    # a maps file without its provenance and no manifest: one line, not KeyError('map_shape')
    loose = tmp_path / "loose"
    table = pq.read_table(out / "maps" / "t-000000.parquet")
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"unioncam.map_shape"}
    write_parquet(table, table.schema.with_metadata(meta), str(loose / "maps" / "x.parquet"))
    with pytest.raises(RunFileError, match=r"x\.parquet records no map shape"):
        read_saliency(loose)
    write_parquet([], with_provenance(metrics_schema(), {}).with_metadata(None), str(loose / "metrics" / "x.parquet"))
    with pytest.raises(RunFileError, match="carries no unioncam schema version"):
        read_metrics(loose)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        cfg, _, _ = finished_run(tmp_path, sanity=True, sanity_layers=2)
        write_report(str(cfg.out), overlays=1)
        shards = tmp_path / "shards"
    finally:
        os.umask(old)
    files = [p for p in [*Path(str(cfg.out)).rglob("*"), *shards.rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    assert {"manifest.json", "t-000000.parquet", "report.html", "summary.csv", "t-000000.tar"} <= names
    assert len({p.parent.name for p in files if p.suffix == ".parquet"}) == 3  # metrics, maps, sanity
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong


def test_a_rescore_of_an_unfinished_run_names_what_it_skips_and_grows_with_the_run(cluster, tmp_path, capsys):
    from unioncam.service.runner import run

    cfg, _, _ = finished_run(tmp_path, n_shards=2, done=1)
    rescore = EvalConfig(rescore=str(cfg.out), protocol="torchcam", metrics=["ad"], workers=1, cpus_per_worker=1,
                         gpus_per_worker=0, report=False)
    first = run(rescore.resolved())
    assert "rescore: skipping 1 shard(s) not done" in capsys.readouterr().out
    assert set(first["shards"]) == {"t-000000"}
    # the run is completed (a byte of its first shard's maps flipped meanwhile: resume redoes that shard)
    maps = Path(str(cfg.out)) / "maps" / "t-000000.parquet"
    damaged = bytearray(maps.read_bytes())
    damaged[page_offsets(maps, "map")[1]] ^= 0x01
    maps.write_bytes(bytes(damaged))
    done = run(EvalConfig(**{**cfg.__dict__, "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}).resolved())
    text = capsys.readouterr().out
    assert "redoing t-000000: maps/t-000000.parquet changed after it was written" in text
    assert done["shards"]["t-000000"]["attempts"] == 2 and done["shards"]["t-000001"]["status"] == "done"
    assert cli(["verify", str(cfg.out)]) == 0
    second = run(rescore.resolved())  # the same rescore directory, extended (not refused)
    assert {n: e["status"] for n, e in second["shards"].items()} == {"t-000000": "done", "t-000001": "done"}
    text = capsys.readouterr().out
    assert "skipping" not in text
    # the run redid t-000000 since the first rescore: its rows are rescored from the new maps
    assert "redoing t-000000: the rescored run redid this shard since it was rescored" in text
    assert second["shards"]["t-000000"]["attempts"] == 2 and second["shards"]["t-000001"]["attempts"] == 1
    third = run(rescore.resolved())
    assert third["shards"]["t-000000"]["attempts"] == 2  # nothing changed: nothing redone


def test_shard_records_are_the_truth_and_only_newer_ones_are_read(tmp_path, monkeypatch):
    from unioncam import storage
    from unioncam.service import rundir

    out = str(tmp_path / "run")
    manifest = rundir.RunManifest(out, {"model": "x"})
    manifest.record("a", status="done", path="a.tar", images=1, rows=1, maps=1, errors=0)  # the first: saved
    manifest.record("b", status="done", path="b.tar", images=2, rows=2, maps=2, errors=0)  # within 5 s: a record
    manifest.record("a", status="failed", path="a.tar", error="worker died: killed")  # attempt 2: a record only
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(summary["shards"]) == {"a"} and summary["shards"]["a"]["status"] == "done"  # as after a crash
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == ["a.1.json", "a.2.json", "b.1.json"]
    reads: list[str] = []
    real = storage.read_text
    monkeypatch.setattr(storage, "read_text", lambda p: reads.append(p) or real(p))
    loaded = rundir.load_manifest(out)
    assert loaded["shards"]["a"]["status"] == "failed" and loaded["shards"]["a"]["attempts"] == 2
    assert loaded["shards"]["b"]["images"] == 2
    assert sorted(os.path.basename(p) for p in reads) == ["a.2.json", "b.1.json", "manifest.json"]
    manifest.save()
    reads.clear()
    assert rundir.load_manifest(out)["shards"] == loaded["shards"]
    assert [os.path.basename(p) for p in reads] == ["manifest.json"]  # every record is in the summary now
