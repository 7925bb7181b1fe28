"""PASCAL VOC2007 → WebDataset shards: ``.jpg`` plus ``.json`` with every object.

VOC boxes are 1-based inclusive pixel indices (``xmin = 1`` is the first column). We store
``[xmin − 1, ymin − 1, xmax, ymax]``: continuous 0-based pixel coordinates in which the box covers
exactly the same pixels (:mod:`unioncam.evaluation`). ``.cls`` holds the index (in
:data:`VOC_CLASSES`) of the first non-difficult object's class, the image's "label"; the EPG
uses the boxes of the class being explained, from ``objects``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unioncam.data.annotations import read_xml_objects
from unioncam.data.shards import Sample, clean_key

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def read_voc_xml(path: Path) -> list[dict[str, Any]]:
    """Objects of one VOC annotation: ``name``, ``bbox`` (converted), ``difficult``, ``truncated``."""
    objects = []
    for obj in read_xml_objects(path):
        if obj.name not in VOC_CLASSES or obj.box is None:
            raise ValueError(f"{path.name}: bad object {obj.name!r}")
        x0, y0, x1, y1 = obj.box
        objects.append({"name": obj.name, "label": VOC_CLASSES.index(obj.name), "bbox": [x0 - 1, y0 - 1, x1, y1],
                        "difficult": obj.difficult, "truncated": obj.truncated})
    return objects


def voc_samples(root: str | os.PathLike[str], split: str = "test") -> tuple[Iterator[Sample], dict[str, Any]]:
    """Samples of ``root`` (``VOCdevkit/VOC2007``) for ``ImageSets/Main/<split>.txt``, and info.

    An image whose annotation is missing or unreadable is written without ``.cls``, with the
    reason in its ``.json``, so the reader reports it. An image that is missing or unreadable does
    not stop the conversion either: its sample has an empty ``.jpg``, no ``.cls`` and
    ``{"file", "error": reason}`` as ``.json``, so the reader turns it into an error record for
    its key; its id is listed in the info's (and so the manifest's) ``image_errors``.
    """
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"no split file {ids_file}")
    ids = ids_file.read_text().split()
    info: dict[str, Any] = {"dataset": f"voc2007-{split}", "label_source": "Annotations/*.xml",
                            "classes": list(VOC_CLASSES),
                            "boxes": "VOC 1-based inclusive → continuous 0-based [xmin-1, ymin-1, xmax, ymax]",
                            "image_errors": []}  # filled while the samples are generated

    def generate() -> Iterator[Sample]:
        for image_id in ids:
            image = root / "JPEGImages" / f"{image_id}.jpg"
            try:
                data = image.read_bytes()
            except OSError as exc:  # missing or unreadable: the sample records why, the others go on
                reason = (f"split lists {image_id} but {image.name} does not exist" if not image.exists()
                          else f"cannot read {image.name}: {exc.strerror or exc}")
                info["image_errors"].append(image_id)
                yield Sample(clean_key(image_id), b"", "jpg", None, {"file": image.name, "error": reason})
                continue
            meta: dict[str, Any] = {"file": image.name}
            label = None
            try:
                objects = read_voc_xml(root / "Annotations" / f"{image_id}.xml")
                meta["objects"] = objects
                easy = [o for o in objects if not o["difficult"]] or objects
                if easy:
                    label = easy[0]["label"]
                    meta["boxes"] = [o["bbox"] for o in objects if o["label"] == label]
            except (OSError, ET.ParseError, ValueError) as exc:
                meta["annotation_error"] = str(exc)
            yield Sample(clean_key(image_id), data, "jpg", label, meta)

    return generate(), info
