"""The offline sample: real photos shipped inside scikit-image and matplotlib, labelled by hand.

Nothing is downloaded: each photo is a file inside an installed package's data folder.

* ImageNet-style: :data:`IMAGENET_LABELS` gives each photo's torchvision class (0–999), chosen by
  looking at the photo: Chelsea is an orange tabby (281), the cup holds espresso (967), the
  rocket on its pad is closest to "missile" (657; ImageNet has no rocket class), the motorbike to
  "moped" (665; no motorcycle class), the cameraman's camera stands on a "tripod" (872), Grace
  Hopper wears a "military uniform" (652), ``clock_motion`` is a motion-blurred "wall clock" (892).
* VOC-style: :data:`VOC_BOXES` gives, per photo, the objects of VOC classes with boxes drawn by
  hand, ``[xmin, ymin, xmax, ymax]`` in continuous pixel coordinates of the original photo.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unioncam import storage
from unioncam.data.shards import Sample, clean_key, write_shards

# name → (package, path inside the package)
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "camera": ("skimage", "data/camera.png"),
    "clock_motion": ("skimage", "data/clock_motion.png"),
    "horse": ("skimage", "data/horse.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

IMAGENET_LABELS: dict[str, int] = {
    "chelsea": 281,  # tabby
    "coffee": 967,  # espresso
    "rocket": 657,  # missile
    "motorcycle": 665,  # moped
    "motorcycle_right": 665,  # moped
    "camera": 872,  # tripod
    "clock_motion": 892,  # wall clock
    "grace_hopper": 652,  # military uniform
}

VOC_BOXES: dict[str, list[tuple[str, list[float]]]] = {
    "chelsea": [("cat", [0, 0, 430, 300])],
    "astronaut": [("person", [0, 10, 420, 512])],
    "motorcycle": [("motorbike", [110, 70, 680, 460])],
    "motorcycle_right": [("motorbike", [70, 70, 630, 460])],
    "camera": [("person", [0, 60, 340, 512])],
    "horse": [("horse", [15, 5, 392, 310])],
    "grace_hopper": [("person", [25, 20, 512, 600])],
}


def sample_photo_paths(names: list[str] | None = None) -> dict[str, Path]:
    """Paths of the sample photos ``names`` (default: all), in that order.

    Raises:
        FileNotFoundError: a package is not installed (``pip install 'unioncam[demo]'``) or lacks
            the file.
    """
    paths: dict[str, Path] = {}
    for name in names or list(SAMPLE_PHOTOS):
        if name not in SAMPLE_PHOTOS:
            raise KeyError(f"no sample photo {name!r}; valid: {', '.join(SAMPLE_PHOTOS)}")
        package, rel = SAMPLE_PHOTOS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"sample photo {name!r} needs the package {package!r}: "
                                    "pip install 'unioncam[demo]'")
        path = Path(spec.origin).parent / rel
        if not path.is_file():
            raise FileNotFoundError(f"sample photo {name!r} not found at {path}")
        paths[name] = path
    return paths


def sample_samples(kind: str) -> Iterator[Sample]:
    """The ImageNet-style (``kind="imagenet"``) or VOC-style (``"voc"``) sample as shard samples."""
    from unioncam.data.voc import VOC_CLASSES

    if kind == "imagenet":
        for name, path in sample_photo_paths(list(IMAGENET_LABELS)).items():
            yield Sample(clean_key(name), path.read_bytes(), path.suffix.lstrip(".").lower(), IMAGENET_LABELS[name],
                         {"file": path.name, "source": SAMPLE_PHOTOS[name][0]})
    elif kind == "voc":
        for name, path in sample_photo_paths(list(VOC_BOXES)).items():
            objects: list[dict[str, Any]] = [
                {"name": c, "label": VOC_CLASSES.index(c), "bbox": b, "difficult": False, "truncated": False}
                for c, b in VOC_BOXES[name]]
            meta: dict[str, Any] = {"file": path.name, "source": SAMPLE_PHOTOS[name][0], "objects": objects,
                                    "boxes": [o["bbox"] for o in objects if o["label"] == objects[0]["label"]]}
            yield Sample(clean_key(name), path.read_bytes(), path.suffix.lstrip(".").lower(), objects[0]["label"], meta)
    else:
        raise ValueError(f"unknown sample kind {kind!r}; valid: imagenet, voc")


def write_sample_shards(out: str | Path, shard_size: int = 4) -> dict[str, dict[str, Any]]:
    """Write ``out/imagenet/`` and ``out/voc/`` shard sets of the sample (``out`` a folder or a URI
    prefix); returns both manifests."""
    out = os.fspath(out)
    info = {"imagenet": {"dataset": "sample-imagenet", "label_source": "hand-chosen (unioncam.data.sample)",
                         "labels": "torchvision 0-999 (sorted wnids)"},
            "voc": {"dataset": "sample-voc", "label_source": "hand-drawn boxes (unioncam.data.sample)",
                    "boxes": "continuous pixel coordinates of the original photo"}}
    return {kind: write_shards(sample_samples(kind), storage.join(out, kind), f"sample-{kind}", shard_size, info[kind])
            for kind in ("imagenet", "voc")}
