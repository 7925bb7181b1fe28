"""Interoperability with the ``webdataset`` package and Ray Data, in both directions.

* Shards written by ``webdataset.TarWriter`` / ``ShardWriter`` in the layout of the public ImageNet-1k
  WebDataset shards (``jpg``/``cls``/``json`` per key; keys with folders; ``.cls`` from an int or text; PAX
  headers, mode 0444) read back through :func:`unioncam.data.shards.iter_samples`, sample for sample.
* Shards written by :func:`unioncam.data.shards.write_shards` read back identically through
  ``webdataset.WebDataset(...).decode("pil")`` and through ``ray.data.read_webdataset``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unioncam.data.sample import sample_photo_paths, write_sample_shards
from unioncam.data.shards import iter_samples
from unioncam.viz import pil_to_tensor

wds = pytest.importorskip("webdataset")
pytest.importorskip("skimage")  # the sample photos

SIZE = (64, 80)  # (H, W) of the decoded tensors


def jpeg_of(path: Path) -> bytes:
    """A real photo as JPEG bytes: the file itself when it is a JPEG, else re-encoded once."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return path.read_bytes()
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def imagenet_style_samples() -> list[dict]:
    """webdataset samples as in the public ImageNet-1k WebDataset shards, with folders in the keys, ``cls`` as
    an int or as text, and ``json`` metadata with boxes (original-pixel ``[xmin, ymin, xmax, ymax]``)."""
    photos = sample_photo_paths(["rocket", "grace_hopper", "chelsea", "coffee", "astronaut", "camera", "motorcycle"])
    keys = ["train/n01440764/n01440764_1", "train/n01443537_2", "val/ILSVRC2012_val_00000001",
            "imagenet.v2/val/n02123045_3", "n01440764_10026", "train/n04228054_5", "val/ILSVRC2012_val_00049999"]
    samples = []
    for i, ((name, path), key) in enumerate(zip(photos.items(), keys, strict=True)):
        data = jpeg_of(path)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        label = (i * 137) % 1000
        meta = {"filename": f"{key.rsplit('/', 1)[-1]}.JPEG", "label": label, "class_name": name,
                "width": width, "height": height,
                "boxes": [[0, 0, width, height], [width / 4, height / 5, width / 2, height / 2.5]][: i % 3]}
        samples.append({"__key__": key, "jpg": data, "cls": label if i % 2 else str(label), "json": meta})
    return samples


def expected(sample: dict) -> dict:
    """What iter_samples must give for a webdataset sample (the image decoded by pil_to_tensor directly)."""
    with Image.open(io.BytesIO(sample["jpg"])) as img:
        img.load()
        width, height = img.size
        image = pil_to_tensor(img, SIZE)
    sx, sy = SIZE[1] / width, SIZE[0] / height
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in sample["json"]["boxes"]]
    return {"key": sample["__key__"], "label": int(sample["cls"]), "meta": sample["json"], "boxes": boxes,
            "image": image, "orig_size": (height, width)}


def check_records(records: list[dict], samples: list[dict], shard_of: dict[str, str]) -> None:
    assert len(records) == len(samples)  # the count check: nothing lost, nothing extra
    assert [r.get("error") for r in records] == [None] * len(samples)
    assert [r["key"] for r in records] == [s["__key__"] for s in samples]  # and in order
    for record, sample in zip(records, samples, strict=True):
        want = expected(sample)
        assert record["shard"] == shard_of[sample["__key__"]]
        assert (record["label"], record["meta"], record["orig_size"]) == (want["label"], want["meta"],
                                                                           want["orig_size"])
        assert len(record["boxes"]) == len(want["boxes"])
        if want["boxes"]:
            np.testing.assert_allclose(record["boxes"], want["boxes"])
        assert record["image"].shape == (3, *SIZE) and torch.equal(record["image"], want["image"]), record["key"]


def test_tarwriter_shards_read_back_sample_for_sample(tmp_path):
    samples = imagenet_style_samples()
    with wds.TarWriter(str(tmp_path / "imagenet1k-train-0000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    # the members as webdataset writes them: PAX headers (float mtime), read-only mode, its user name
    import tarfile

    with tarfile.open(tmp_path / "imagenet1k-train-0000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == [f"train/n01440764/n01440764_1.{e}" for e in ("cls", "jpg", "json")]
    assert members[0].mode == 0o444 and members[0].uname == "bigdata" and "mtime" in members[0].pax_headers
    assert (tmp_path / "imagenet1k-train-0000.tar").read_bytes().count(b"PaxHeader") >= len(samples) * 3

    records = list(iter_samples(str(tmp_path / "imagenet1k-train-0000.tar"), size=SIZE))
    check_records(records, samples, {s["__key__"]: "imagenet1k-train-0000.tar" for s in samples})


def test_shardwriter_shards_read_back_sample_for_sample(tmp_path):
    samples = imagenet_style_samples()
    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=3, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    names = sorted(p.name for p in tmp_path.glob("wds-*.tar"))
    assert names == ["wds-000000.tar", "wds-000001.tar", "wds-000002.tar"]
    shard_of = {s["__key__"]: names[i // 3] for i, s in enumerate(samples)}
    records = list(iter_samples(str(tmp_path / "wds-{000000..000002}.tar"), size=SIZE))
    check_records(records, samples, shard_of)


def test_compressed_tarwriter_shard_reads_back(tmp_path):
    samples = imagenet_style_samples()[:4]
    with wds.TarWriter(str(tmp_path / "train-0000.tar.gz")) as sink:  # gzip from the name
        for sample in samples:
            sink.write(sample)
    assert (tmp_path / "train-0000.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    records = list(iter_samples(tmp_path / "train-0000.tar.gz", size=SIZE))
    check_records(records, samples, {s["__key__"]: "train-0000.tar.gz" for s in samples})


def test_tar_of_a_folder_reads_back_without_directory_rows(tmp_path):
    """Shards made with ``tar cf shard.tar train/`` (as webdataset's docs do) hold directory members, which
    webdataset and Ray skip: they are not samples (they used to become "no image member" error rows)."""
    import tarfile

    samples = imagenet_style_samples()[:3]
    for sample in samples:  # train/n01440764/n01440764_1.jpg ... as files on disk
        members = {"jpg": sample["jpg"], "cls": str(sample["cls"]).encode(),
                   "json": json.dumps(sample["json"]).encode()}
        for ext, data in members.items():
            path = tmp_path / "src" / f"{sample['__key__']}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    with tarfile.open(tmp_path / "folder.tar", "w") as tar:  # recursive and sorted, like `tar --sort=name`
        for top in sorted((tmp_path / "src").iterdir()):
            tar.add(top, arcname=top.name)
    with tarfile.open(tmp_path / "folder.tar") as tar:
        assert sum(m.isdir() for m in tar.getmembers()) == 3  # train/, train/n01440764/, val/
    samples.sort(key=lambda s: s["__key__"])
    records = list(iter_samples(tmp_path / "folder.tar", size=SIZE))
    check_records(records, samples, {s["__key__"]: "folder.tar" for s in samples})
    assert [s["__key__"] for s in wds.WebDataset([str(tmp_path / "folder.tar")], shardshuffle=False)] == [
        r["key"] for r in records]


@pytest.fixture(scope="module")
def our_shards(tmp_path_factory):
    """Our sample shard sets (ImageNet-style: JPEG, PNG, grayscale; VOC-style: boxes, an RGBA PNG), 4 a shard."""
    root = tmp_path_factory.mktemp("ours")
    manifests = write_sample_shards(root, shard_size=4)
    return {kind: ([str(root / kind / s["name"]) for s in m["shards"]], m) for kind, m in manifests.items()}


def our_members(urls: list[str]) -> list[dict[str, bytes]]:
    """Our shards' samples as raw members, by tarfile (the ground truth for the other readers)."""
    import tarfile

    out: list[dict[str, bytes]] = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not out or out[-1]["__key__"] != key:
                    out.append({"__key__": key})
                out[-1][ext] = tar.extractfile(member).read()
    return out


@pytest.mark.parametrize("kind", ["imagenet", "voc"])
def test_our_shards_read_back_through_webdataset(our_shards, kind):
    urls, manifest = our_shards[kind]
    raw = our_members(urls)
    ours = list(iter_samples(urls, size=SIZE))
    assert len(raw) == len(ours) == manifest["count"] and all("error" not in r for r in ours)

    undecoded = list(wds.WebDataset(urls, shardshuffle=False))  # the bytes, as written
    assert len(undecoded) == manifest["count"]
    for theirs, mine in zip(undecoded, raw, strict=True):
        assert theirs["__key__"] == mine["__key__"] and theirs["__url__"] in urls
        assert {k: v for k, v in theirs.items() if not k.startswith("__")} == {k: v for k, v in mine.items()
                                                                               if k != "__key__"}

    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))  # no .pyd/.pickle members: nothing unpickled
    assert len(decoded) == manifest["count"]
    for theirs, mine, member in zip(decoded, ours, raw, strict=True):
        assert theirs["__key__"] == mine["key"]
        assert theirs["cls"] == mine["label"] and isinstance(theirs["cls"], int)
        assert theirs["json"] == mine["meta"]
        ext = next(e for e in ("jpg", "png") if e in theirs)
        picture = theirs[ext]
        assert isinstance(picture, Image.Image) and picture.mode == "RGB"  # decode("pil") converts to RGB
        with Image.open(io.BytesIO(member[ext])) as original:
            original.load()
            np.testing.assert_array_equal(np.asarray(picture), np.asarray(original.convert("RGB")))
            assert torch.equal(mine["image"], pil_to_tensor(original, SIZE))
            if "A" not in original.mode:  # RGBA: webdataset drops alpha, we composite it on black
                assert torch.equal(mine["image"], pil_to_tensor(picture, SIZE)), mine["key"]
    assert any("A" in Image.open(io.BytesIO(m.get("png", b""))).mode for m in raw if "png" in m) == (kind == "voc")


@pytest.mark.parametrize("kind", ["imagenet", "voc"])
def test_our_shards_read_back_through_ray_data(cluster, our_shards, kind):
    """Ray Data on the session cluster (tests/conftest.py connects this process as its driver)."""
    import ray.data

    urls, manifest = our_shards[kind]
    raw = {m["__key__"]: m for m in our_members(urls)}
    folder = str(Path(urls[0]).parent)  # holds manifest.json too: file_extensions keeps it out

    undecoded = ray.data.read_webdataset(folder, file_extensions=["tar"], decoder=None)  # the bytes, as written
    assert undecoded.count() == manifest["count"]
    rows = undecoded.take_all()
    assert len(rows) == manifest["count"] and sorted(r["__key__"] for r in rows) == sorted(raw)
    for row in rows:
        assert {k: v for k, v in row.items() if v is not None and not k.startswith("__")} == {
            k: v for k, v in raw[row["__key__"]].items() if k != "__key__"}

    # Ray's default decoder gives numpy arrays of each image's own shape (H×W for grayscale, H×W×3): a mix that
    # Ray's tensor column cannot hold, so the column stays one of objects.
    context = ray.data.DataContext.get_current()
    saved, context.enable_tensor_extension_casting = context.enable_tensor_extension_casting, False
    try:
        decoded = ray.data.read_webdataset(urls).take_all()
    finally:
        context.enable_tensor_extension_casting = saved
    assert len(decoded) == manifest["count"]
    for row in decoded:
        member = raw[row["__key__"]]
        assert row["cls"] == int(member["cls"]) and row["json"] == json.loads(member["json"])
        ext = next(e for e in ("jpg", "png") if e in member)
        with Image.open(io.BytesIO(member[ext])) as original:
            np.testing.assert_array_equal(np.asarray(row[ext]), np.asarray(original))

    # Our own decoding as a Ray decoder (unioncam is importable on the workers): the same tensors as iter_samples.
    def to_tensor(sample: dict) -> dict:
        from unioncam.data.shards import decode_sample

        parts = {k: v for k, v in sample.items() if not k.startswith("__")}
        record = decode_sample(sample["__key__"], parts, SIZE)
        return {"__key__": record["key"], "label": record["label"], "image": record["image"].numpy()}

    ours = {r["key"]: r for r in iter_samples(urls, size=SIZE)}
    theirs = ray.data.read_webdataset(urls, decoder=to_tensor).take_all()
    assert len(theirs) == len(ours) == manifest["count"]
    for row in theirs:
        mine = ours[row["__key__"]]
        assert row["label"] == mine["label"]
        assert torch.equal(torch.from_numpy(np.array(row["image"])), mine["image"]), row["__key__"]
