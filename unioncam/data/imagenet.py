"""ILSVRC2012 validation set → WebDataset shards, with torchvision's 0–999 labels.

Labels: torchvision's class index is the position of the wnid in the sorted list of the 1000
wnids (``imagenet_wnids.txt``, shipped with the package). Accepted label sources:

* ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString`` with ``"wnid x0 y0 x1 y1 ..."``;
  its boxes are used when no ``--boxes`` is given.
* the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one 1-based ILSVRC2012_ID per line,
  in file-name order. The IDs follow ``meta.mat``'s order, *not* the sorted wnids, so the
  devkit's ``data/meta.mat`` is required (found beside the txt, or given with ``meta=``).
* the ImageFolder layout: ``DIR/<wnid>/*.JPEG`` (then ``labels`` is not needed).

Both layouts take visible files with an image extension a shard accepts (``.jpeg``, ``.jpg``, ``.png``,
..., :data:`unioncam.viz.IMAGE_EXTENSIONS`; any case), nothing else.

Boxes (optional): the val XMLs (a folder of ``ILSVRC2012_val_XXXXXXXX.xml``) or the LOC csv.
ImageNet boxes are inclusive pixel indices; we store ``[xmin, ymin, xmax + 1, ymax + 1]`` in
continuous pixel coordinates (:mod:`unioncam.evaluation`) of the original image, with each box's
wnid and class index, and the target class's boxes under ``boxes``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from unioncam.data.annotations import read_xml_objects
from unioncam.data.shards import Sample, clean_key
from unioncam.viz import IMAGE_EXTENSIONS


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 wnids, sorted: index = torchvision's class index."""
    text = resources.files("unioncam.data").joinpath("imagenet_wnids.txt").read_text()
    return tuple(text.split())


@cache
def _wnid_table() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def wnid_index(wnid: str) -> int:
    """torchvision's class index of ``wnid``; raises ``ValueError`` for an unknown wnid."""
    table = _wnid_table()
    if wnid not in table:
        raise ValueError(f"{wnid!r} is not one of the 1000 ILSVRC2012 classes")
    return table[wnid]


def read_meta_mat(path: str | os.PathLike[str]) -> dict[int, str]:
    """``{ILSVRC2012_ID: wnid}`` for the 1000 leaf classes of the devkit's ``meta.mat``."""
    from scipy.io import loadmat

    synsets = loadmat(os.fspath(path), squeeze_me=True)["synsets"]
    table = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    if len(table) != 1000:
        raise ValueError(f"{path}: expected 1000 leaf synsets, found {len(table)}")
    return table


def read_ground_truth(path: Path, meta: Path | None) -> dict[str, str]:
    """Devkit ground truth → ``{stem: wnid}``; line ``i`` belongs to ``ILSVRC2012_val_{i:08d}``."""
    meta = meta or path.parent / "meta.mat"
    if not meta.is_file():
        raise FileNotFoundError(f"{path.name} holds ILSVRC2012_IDs in meta.mat order; pass the devkit's "
                                f"meta.mat (looked for {meta})")
    ids = read_meta_mat(meta)
    out = {}
    for i, line in enumerate(path.read_text().split(), start=1):
        out[f"ILSVRC2012_val_{i:08d}"] = ids[int(line)]
    return out


def read_loc_csv(path: Path) -> tuple[dict[str, str], dict[str, list[tuple[str, list[float]]]]]:
    """``LOC_val_solution.csv`` → ``({stem: wnid}, {stem: [(wnid, box), ...]})`` (first wnid = label)."""
    labels: dict[str, str] = {}
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parts = row["PredictionString"].split()
            objs = [(parts[i], [float(v) for v in parts[i + 1 : i + 5]]) for i in range(0, len(parts) - 4, 5)]
            if objs:
                labels[row["ImageId"]] = objs[0][0]
                boxes[row["ImageId"]] = [(w, [b[0], b[1], b[2] + 1, b[3] + 1]) for w, b in objs]
    return labels, boxes


def read_box_xml(path: Path) -> list[tuple[str, list[float]]]:
    """One ImageNet/VOC-style annotation XML → ``[(name, [xmin, ymin, xmax+1, ymax+1]), ...]``."""
    return [(obj.name, [obj.box[0], obj.box[1], obj.box[2] + 1, obj.box[3] + 1])
            for obj in read_xml_objects(path) if obj.box is not None]


# what both layouts take (case-insensitive): the image members shards accept (unioncam.viz.IMAGE_EXTENSIONS)
IMAGE_SUFFIXES: tuple[str, ...] = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


def _is_image(path: Path) -> bool:
    """A visible file with an image suffix: ``.DS_Store``, macOS's ``._*`` resource forks, ``Thumbs.db``,
    notes and folders are skipped."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def imagenet_samples(images: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None,
                     boxes: str | os.PathLike[str] | None = None,
                     meta: str | os.PathLike[str] | None = None) -> tuple[Iterator[Sample], dict[str, Any]]:
    """Samples of the val set (sorted by file name) and manifest info (label source, errors).

    An image without a label is still written, without ``.cls``, so the reader reports it as
    "missing label"; its key is listed in the info's ``unlabelled``.
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder {root}")
    box_table: dict[str, list[tuple[str, list[float]]]] = {}
    if labels is None:  # ImageFolder layout
        folders = sorted(d for d in root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"{root} has no class folders; pass --labels for a flat folder")
        bad = [d.name for d in folders if d.name not in _wnid_table()]
        if bad:
            raise ValueError(f"{root}: folders that are not ILSVRC2012 wnids: {', '.join(bad[:5])}")
        files = [(f, d.name) for d in folders for f in sorted(d.iterdir()) if _is_image(f)]
        table = {f.stem: w for f, w in files}
        source = "folders"
        paths = [f for f, _ in files]
    else:
        lab = Path(labels)
        if lab.suffix.lower() == ".csv":
            table, box_table = read_loc_csv(lab)
            source = "LOC_val_solution.csv"
        else:
            table = read_ground_truth(lab, Path(meta) if meta else None)
            source = "devkit ground truth + meta.mat"
        paths = sorted(f for f in root.iterdir() if _is_image(f))
    if boxes is not None:
        bpath = Path(boxes)
        if bpath.is_dir():
            box_table = {x.stem: read_box_xml(x) for x in sorted(bpath.glob("*.xml"))}
        else:
            box_table = read_loc_csv(bpath)[1]
    unlabelled = [p.stem for p in paths if p.stem not in table]
    info = {"dataset": "imagenet-val", "label_source": source, "labels": "torchvision 0-999 (sorted wnids)",
            "boxes": "xml" if boxes and Path(boxes).is_dir() else ("csv" if box_table else None),
            "unlabelled": unlabelled}

    def generate() -> Iterator[Sample]:
        for path in paths:
            wnid = table.get(path.stem)
            label = wnid_index(wnid) if wnid else None
            objs = box_table.get(path.stem, [])
            meta_json: dict[str, Any] = {"file": path.name, "wnid": wnid}
            if objs:
                meta_json["objects"] = [{"wnid": w, "label": _wnid_table().get(w),
                                         "bbox": b} for w, b in objs]
                meta_json["boxes"] = [b for w, b in objs if w == wnid]
            ext = path.suffix.lower().lstrip(".")
            yield Sample(clean_key(path.stem), path.read_bytes(), "jpg" if ext == "jpeg" else ext, label, meta_json)

    return generate(), info
