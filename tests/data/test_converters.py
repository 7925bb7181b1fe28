"""The dataset converters (VOC, ImageNet): one XML parser, bad images as error records, folder layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unioncam.data.annotations import XMLObject, parse_xml_objects, read_xml_objects
from unioncam.data.imagenet import imagenet_samples, read_box_xml
from unioncam.data.shards import MANIFEST, iter_samples, write_shards
from unioncam.data.voc import read_voc_xml, voc_samples

REPO = Path(__file__).resolve().parents[2]
KIT_FOX = "n02119789"  # torchvision 278



def jpeg(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()




# -- annotation XML ------------------------------------------------------------------------------
XML = """<annotation><filename>x.jpg</filename>
  <object><name> dog </name><difficult>1</difficult><truncated>0</truncated>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>8</ymax></bndbox></object>
  <object><name>person</name><truncated>1</truncated>
    <bndbox><xmin>11</xmin><ymin>21.5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
  <object><name>cat</name></object>
</annotation>"""


def test_one_xml_parser_for_voc_and_imagenet(tmp_path):
    objects = parse_xml_objects(XML)
    assert objects == [XMLObject("dog", (1.0, 2.0, 10.0, 8.0), difficult=True, truncated=False),
                       XMLObject("person", (11.0, 21.5, 50.0, 40.0), difficult=False, truncated=True),
                       XMLObject("cat", None, difficult=False, truncated=False)]
    path = tmp_path / "a.xml"
    path.write_text(XML)
    assert read_xml_objects(path) == objects
    # ImageNet: inclusive indices → [xmin, ymin, xmax + 1, ymax + 1]; an object without a box is skipped
    assert read_box_xml(path) == [("dog", [1.0, 2.0, 11.0, 9.0]), ("person", [11.0, 21.5, 51.0, 41.0])]
    # VOC: 1-based inclusive → [xmin − 1, ymin − 1, xmax, ymax]; an object without a box is an error
    with pytest.raises(ValueError, match="bad object 'cat'"):
        read_voc_xml(path)
    path.write_text(XML.replace("<object><name>cat</name></object>", ""))
    dog, person = read_voc_xml(path)
    assert dog == {"name": "dog", "label": 11, "bbox": [0.0, 1.0, 10.0, 8.0], "difficult": True, "truncated": False}
    assert person["bbox"] == [10.0, 20.5, 50.0, 40.0] and person["truncated"] and not person["difficult"]
    missing = parse_xml_objects("<a><object><name>x</name><bndbox><xmin>3</xmin></bndbox></object></a>")[0]
    assert missing.box is not None and missing.box[0] == 3.0 and all(np.isnan(missing.box[1:]))


# -- converters ----------------------------------------------------------------------------------
def test_a_missing_or_unreadable_voc_image_is_an_error_record_not_an_abort(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Main/test.txt").write_text("000001\n000002\n000003\n000004\n")
    box = ("<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
           "<ymax>8</ymax></bndbox></object></annotation>")
    for i in (1, 2, 3, 4):
        (root / f"Annotations/00000{i}.xml").write_text(box)
    (root / "JPEGImages/000001.jpg").write_bytes(jpeg(1))
    (root / "JPEGImages/000003.jpg").mkdir()  # listed, present, but not a readable file
    (root / "JPEGImages/000004.jpg").write_bytes(jpeg(4))  # 000002.jpg does not exist
    samples, info = voc_samples(root)
    out = tmp_path / "shards"
    manifest = write_shards(samples, out, "voc", 2, info)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "voc-000000.tar", "voc-000001.tar"]  # no .tmp
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest and manifest["count"] == 4 and manifest["labelled"] == 2
    assert manifest["image_errors"] == ["000002", "000003"]
    records = {r["key"]: r for r in iter_samples(str(out / "*.tar"))}
    assert sorted(records) == ["000001", "000002", "000003", "000004"]
    assert "error" not in records["000001"] and "error" not in records["000004"]
    assert records["000001"]["label"] == records["000004"]["label"] == 11
    assert "000002.jpg" in records["000002"]["error"] and "000003.jpg" in records["000003"]["error"]
    with __import__("tarfile").open(out / "voc-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000002.json").read())
    assert meta == {"file": "000002.jpg", "error": "split lists 000002 but 000002.jpg does not exist"}


def test_imagenet_folder_layout_takes_only_image_files(tmp_path):
    folder = tmp_path / "val" / KIT_FOX
    folder.mkdir(parents=True)
    (folder / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(1))
    (folder / "b.png").write_bytes(jpeg(2))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()
    (tmp_path / "val" / ".DS_Store").write_bytes(b"\x00")
    samples, info = imagenet_samples(tmp_path / "val")
    got = [(s.key, s.ext, s.label) for s in samples]
    assert got == [("ILSVRC2012_val_00000001", "jpg", 278), ("b", "png", 278)]
    assert info["unlabelled"] == []
