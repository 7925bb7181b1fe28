"""Dataset conversion to WebDataset shards and robust reading, on fake ImageNet/VOC trees."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from unioncam.cli import main
from unioncam.data.imagenet import imagenet_samples, imagenet_wnids
from unioncam.data.sample import write_sample_shards
from unioncam.data.shards import expand_shards, iter_samples, write_shards
from unioncam.data.voc import voc_samples
from unioncam.models import imagenet_classes

SEA_SNAKE, KIT_FOX = "n01751748", "n02119789"  # torchvision 65 and 278; devkit ILSVRC2012_ID 490 and 1


def jpeg(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG")
    return buf.getvalue()


def test_wnid_order_is_torchvisions():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    names = imagenet_classes()
    assert (wnids.index(SEA_SNAKE), names[65]) == (65, "sea snake")
    assert (wnids.index(KIT_FOX), names[278]) == (278, "kit fox")


@pytest.fixture
def val_dir(tmp_path):
    """Four val images: 1 sea snake, 2 kit fox, 3 unlabelled in the csv, 4 a corrupt JPEG."""
    d = tmp_path / "val"
    d.mkdir()
    for i in (1, 2, 3):
        (d / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(i))
    (d / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    return d


def write_meta_mat(path, pins: dict[int, str]):
    """A devkit-shaped meta.mat: 1000 leaf synsets whose ILSVRC2012_IDs are a shuffle of the
    sorted wnids (as in the real devkit, ID order is not sorted order), with ``pins`` fixed, plus
    one non-leaf synset that must be ignored."""
    scipy_io = pytest.importorskip("scipy.io")
    rest = [w for w in imagenet_wnids() if w not in pins.values()]
    np.random.default_rng(0).shuffle(rest)
    ids = {i: pins.get(i) or rest.pop() for i in range(1, 1001)}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, w, 0) for i, w in ids.items()] + [(1001, "n00001740", "entity", 3)]
    scipy_io.savemat(path, {"synsets": np.array(rows, dtype=dtype)})


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.mark.parametrize("source", ["csv", "devkit", "folders"])
def test_imagenet_label_sources(val_dir, tmp_path, source):
    images, labels = val_dir, None
    if source == "csv":
        labels = tmp_path / "LOC_val_solution.csv"
        labels.write_text("ImageId,PredictionString\n"
                          f"ILSVRC2012_val_00000001,{SEA_SNAKE} 1 2 20 25 {SEA_SNAKE} 5 5 9 9\n"
                          f"ILSVRC2012_val_00000002,{KIT_FOX} 0 0 39 29\n"
                          f"ILSVRC2012_val_00000004,{KIT_FOX} 0 0 10 10\n")
    elif source == "devkit":
        labels = tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt"
        labels.parent.mkdir()
        labels.write_text("490\n1\n")  # images 1, 2; image 3 and 4 have no line
        write_meta_mat(labels.parent / "meta.mat", {490: SEA_SNAKE, 1: KIT_FOX})
    else:
        images = tmp_path / "folders"
        for wnid, i in ((SEA_SNAKE, 1), (KIT_FOX, 2)):
            (images / wnid).mkdir(parents=True)
            (images / wnid / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(i))
    samples, info = imagenet_samples(images, labels)
    manifest = write_shards(samples, tmp_path / "shards", "imagenet-val", shard_size=2, info=info)
    records = {r["key"]: r for r in iter_samples(str(tmp_path / "shards" / "imagenet-val-*.tar"))}
    assert records["ILSVRC2012_val_00000001"]["label"] == 65
    assert records["ILSVRC2012_val_00000002"]["label"] == 278
    assert records["ILSVRC2012_val_00000001"]["image"].shape == (3, 224, 224)
    members = read_tar(tmp_path / "shards" / "imagenet-val-000000.tar")
    assert members["ILSVRC2012_val_00000001.jpg"] == jpeg(1)  # original bytes, not re-encoded
    assert list(members)[:3] == [f"ILSVRC2012_val_00000001.{e}" for e in ("jpg", "json", "cls")]
    shard = manifest["shards"][0]
    import hashlib

    assert shard["sha256"] == hashlib.sha256((tmp_path / "shards" / shard["name"]).read_bytes()).hexdigest()
    if source != "folders":
        assert "cannot decode" in records["ILSVRC2012_val_00000004"]["error"]
        assert records["ILSVRC2012_val_00000003"]["error"] == "missing label (ILSVRC2012_val_00000003.cls)"
        assert manifest["count"] == 4 and "ILSVRC2012_val_00000003" in manifest["unlabelled"]
    if source == "csv":  # inclusive pixel boxes → continuous, then rescaled 40×30 → 224×224
        boxes = records["ILSVRC2012_val_00000001"]["boxes"]
        np.testing.assert_allclose(boxes, [[1 * 5.6, 2 * 224 / 30, 21 * 5.6, 26 * 224 / 30],
                                           [5 * 5.6, 5 * 224 / 30, 10 * 5.6, 10 * 224 / 30]])


def test_devkit_ground_truth_needs_meta(val_dir, tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n")
    with pytest.raises(FileNotFoundError, match=r"meta\.mat"):
        imagenet_samples(val_dir, gt)


def test_imagenet_boxes_from_xml(val_dir, tmp_path):
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000002,{KIT_FOX} 0 0 1 1\n")
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "ILSVRC2012_val_00000002.xml").write_text(
        f"<annotation><object><name>{KIT_FOX}</name><bndbox><xmin>3</xmin><ymin>4</ymin>"
        f"<xmax>12</xmax><ymax>14</ymax></bndbox></object><object><name>{SEA_SNAKE}</name><bndbox>"
        "<xmin>0</xmin><ymin>0</ymin><xmax>1</xmax><ymax>1</ymax></bndbox></object></annotation>")
    samples, _ = imagenet_samples(val_dir, labels, boxes=xml)
    write_shards(samples, tmp_path / "s", "x", 10)
    rec = next(r for r in iter_samples(str(tmp_path / "s" / "x-000000.tar")) if r["key"].endswith("02"))
    assert rec["meta"]["boxes"] == [[3, 4, 13, 15]]  # only the target class's box
    assert [o["label"] for o in rec["meta"]["objects"]] == [278, 65]


def test_truncated_tar_keeps_what_was_read(val_dir, tmp_path):
    samples = ({"key": f"img{i}", "data": jpeg(i)} for i in range(6))
    from unioncam.data.shards import Sample

    write_shards((Sample(s["key"], s["data"], "jpg", i, {}) for i, s in enumerate(samples)), tmp_path, "t", 3)
    second = tmp_path / "t-000001.tar"
    data = second.read_bytes()
    cut = data.index(b"img4.jpg") + 512 + 100  # inside img4's image data
    second.write_bytes(data[:cut])
    records = list(iter_samples([tmp_path / "t-000000.tar", second]))
    assert [r["key"] for r in records if "error" not in r] == ["img0", "img1", "img2", "img3"]
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["key"] == "img4" and "truncated" in errors[0]["error"]
    assert [r["label"] for r in records if "error" not in r] == [0, 1, 2, 3]


def test_gif_members_decode_and_the_count_is_the_records_yielded(tmp_path):
    """An animated GIF is an image member (its first frame, as ``unioncam explain`` reads it), and
    :func:`count_samples` (the progress total) counts every record the reader yields, error records
    of keys without an image included, also for a truncated shard."""
    from unioncam.data.shards import count_samples
    from unioncam.viz import load_image

    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 10, 10), (10, 200, 10))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    members = [("a.jpg", jpeg(1)), ("a.cls", b"1"), ("b.gif", gif.getvalue()), ("b.cls", b"2"), ("c.cls", b"3"),
               ("d.jpg", jpeg(2)), ("d.cls", b"4")]
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = list(iter_samples(path, (30, 40)))
    assert [(r["key"], "error" in r) for r in records] == [("a", False), ("b", False), ("c", True), ("d", False)]
    (tmp_path / "b.gif").write_bytes(gif.getvalue())
    first = records[1]["image"].numpy()  # the first frame: red, not the second's green
    assert np.allclose(first, np.array([200, 10, 10])[:, None, None] / 255, atol=3 / 255)
    assert np.allclose(records[1]["image"].numpy(), load_image(tmp_path / "b.gif", (30, 40)).numpy(), atol=1 / 255)
    assert count_samples(str(path)) == len(records) == 4
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"d.jpg") + 512 + 50])  # d's image cut short: an error record for d
    assert count_samples(str(path)) == len(list(iter_samples(path, (30, 40)))) == 4


def test_voc_conversion_boxes_and_flags(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    (root / "JPEGImages/000001.jpg").write_bytes(jpeg(1, (50, 40)))
    (root / "JPEGImages/000002.jpg").write_bytes(jpeg(2))
    (root / "Annotations/000001.xml").write_text(
        "<annotation><object><name>dog</name><difficult>1</difficult><truncated>0</truncated><bndbox>"
        "<xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>8</ymax></bndbox></object>"
        "<object><name>person</name><difficult>0</difficult><truncated>1</truncated><bndbox>"
        "<xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>")
    samples, info = voc_samples(root)  # 000002 has no annotation: written without a label
    write_shards(samples, tmp_path / "s", "voc", 10, info)
    records = {r["key"]: r for r in iter_samples(str(tmp_path / "s" / "*.tar"))}
    rec = records["000001"]
    assert rec["label"] == 14  # person: the first non-difficult object
    dog, person = rec["meta"]["objects"]
    assert dog["bbox"] == [0, 0, 10, 8] and dog["difficult"] and not dog["truncated"]
    assert person["bbox"] == [10, 20, 50, 40] and person["truncated"]
    np.testing.assert_allclose(rec["boxes"], [[10 * 224 / 50, 20 * 224 / 40, 224, 224]])
    assert records["000002"]["error"] == "missing label (000002.cls)"


def test_reader_converts_grayscale_cmyk_16bit(tmp_path):
    from unioncam.data.shards import Sample

    buf16 = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(buf16, "PNG")
    samples = [Sample("gray", jpeg(1, mode="L"), "jpg", 1), Sample("cmyk", jpeg(2, mode="CMYK"), "jpg", 2),
               Sample("deep", buf16.getvalue(), "png", 3)]
    write_shards(samples, tmp_path, "c", 10)
    records = list(iter_samples(tmp_path / "c-000000.tar", size=(16, 16)))
    assert all("error" not in r and r["image"].shape == (3, 16, 16) for r in records)
    assert float(records[2]["image"].min()) == 1.0  # 16-bit white stays white, not clipped garbage


def test_expand_shards_patterns(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    assert [p[-12:] for p in expand_shards(str(tmp_path / "s-{000000..000001}.tar"))] == ["s-000000.tar",
                                                                                         "s-000001.tar"]
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="no shard"):
        expand_shards(str(tmp_path / "missing-*.tar"))


def test_sample_shards_offline(tmp_path):
    manifests = write_sample_shards(tmp_path)
    assert manifests["imagenet"]["count"] == 8 and manifests["voc"]["count"] == 7
    imnet = {r["key"]: r for r in iter_samples(str(tmp_path / "imagenet" / "*.tar"))}
    assert imnet["chelsea"]["label"] == 281 and imnet["coffee"]["label"] == 967
    voc = {r["key"]: r for r in iter_samples(str(tmp_path / "voc" / "*.tar"))}
    assert voc["chelsea"]["label"] == 7 and voc["motorcycle"]["label"] == 13
    # motorbike box [110, 70, 680, 460] on the 741×500 photo, rescaled to 224×224
    np.testing.assert_allclose(voc["motorcycle"]["boxes"],
                               [[110 * 224 / 741, 70 * 224 / 500, 680 * 224 / 741, 460 * 224 / 500]])
    assert json.loads((tmp_path / "voc" / "manifest.json").read_text())["dataset"] == "sample-voc"


def test_shards_cli(val_dir, tmp_path, capsys):
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{SEA_SNAKE} 1 2 20 25\n")
    assert main(["shards", "imagenet", "--images", str(val_dir), "--labels", str(labels),
                 "--out", str(tmp_path / "o"), "--shard-size", "3"]) == 0
    assert "4 samples (1 labelled) in 2 shards" in capsys.readouterr().out
    assert main(["shards", "imagenet", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no image folder" in capsys.readouterr().err


# -- the reader: damage in the data becomes records, I/O trouble is raised --------------------------
def _tar(path, members, mode="w"):
    """Write ``members`` ((name, bytes) pairs) as a tar, in that order."""
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_keys_keep_folders_as_webdataset_does(tmp_path):
    _tar(tmp_path / "k.tar", [("train/x.jpg", jpeg(1)), ("train/x.cls", b"1"),
                              ("val/x.jpg", jpeg(2)), ("val/x.cls", b"2"), ("val/y.seg.png", b"?")])
    records = list(iter_samples(str(tmp_path / "k.tar"), (16, 16)))
    assert [(r["key"], r.get("label")) for r in records] == [("train/x", 1), ("val/x", 2), ("val/y", None)]
    assert "no image member (have: seg.png)" in records[2]["error"]


def test_duplicates_bad_metadata_and_bad_labels_cost_only_their_sample(tmp_path):
    _tar(tmp_path / "d.tar", [
        ("a.jpg", jpeg(1)), ("a.cls", b"1"), ("a.cls", b"2"),  # duplicate member
        ("b.jpg", jpeg(2)), ("b.cls", b"3"), ("b.json", b"[1, 2]"),  # metadata not an object
        ("c.jpg", jpeg(3)), ("c.cls", b"4"), ("c.json", b'{"boxes": [[1, 2, 3]]}'),  # a box of 3 numbers
        ("d.jpg", jpeg(4)), ("d.cls", b"99999999999"),  # too large for the label column
        ("e.jpg", jpeg(5)), ("e.cls", b"1_0"),  # int() would read 10
        ("f.jpg", jpeg(6)), ("f.cls", b"7")])
    records = {r["key"]: r for r in iter_samples(str(tmp_path / "d.tar"), (16, 16))}
    assert "duplicate member a.cls" in records["a"]["error"]
    assert "not an object" in records["b"]["error"]
    assert "bad boxes" in records["c"]["error"]
    assert "bad label" in records["d"]["error"] and "bad label" in records["e"]["error"]
    assert records["f"]["label"] == 7 and "error" not in records["f"]


def test_compressed_shards_are_read_and_named(tmp_path):
    from unioncam.data.shards import shard_name

    members = [("a.jpg", jpeg(1)), ("a.cls", b"5")]
    _tar(tmp_path / "z-000000.tar.gz", members, "w:gz")
    _tar(tmp_path / "z-000001.tar.xz", members, "w:xz")
    for path in ("z-000000.tar.gz", "z-000001.tar.xz"):
        assert [r["label"] for r in iter_samples(str(tmp_path / path), (16, 16))] == [5]
    assert shard_name("s3://b/z-000000.tar.gz") == "z-000000" and shard_name("/x/y.tgz") == "y"


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_tar_that_ends_early_is_never_complete(tmp_path, damage):
    from unioncam.data.shards import Sample

    write_shards([Sample(f"img{i}", jpeg(i), "jpg", i) for i in range(6)], tmp_path, "t", 6)
    path = tmp_path / "t-000000.tar"
    data = bytearray(path.read_bytes())
    header = data.index(b"img3.jpg")  # the 4th sample's first member header
    if damage == "flip":
        data[header + 150] ^= 0xFF  # inside the header's checksum field
    else:
        data = data[:header]  # cut exactly at a member header
    path.write_bytes(bytes(data))
    records = list(iter_samples(str(path), (16, 16)))
    # img2 was being read when the damage showed (it might have had more members): its record says so
    assert [r["key"] for r in records if "error" not in r] == ["img0", "img1"]
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["key"] == "img2" and "truncated or corrupt tar" in errors[0]["error"]
    assert ("damaged member header" if damage == "flip" else "without an end-of-archive marker") in errors[0]["error"]


def test_an_unreadable_shard_is_raised_not_recorded(tmp_path, monkeypatch):
    from unioncam import storage

    _tar(tmp_path / "p.tar", [("a.jpg", jpeg(1)), ("a.cls", b"1")])
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("p.tar"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)  # chmod 000 does not stop root
    with pytest.raises(storage.StorageError, match=r"cannot open .*p\.tar.*Permission denied"):
        list(iter_samples(str(tmp_path / "p.tar"), (16, 16)))
