"""Every method on the bundled real photos with the real EfficientNet-Lite0.

Writes an overlay PNG per photo and method, and ``grid.png`` (photos × methods), to ``--out``.
Run: ``python jobs/explain_sample.py [--out out] [--photos chelsea,coffee,...] [--method all]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from unioncam.cli import main as cli_main
from unioncam.cli import parse_methods
from unioncam.data.sample import sample_photo_paths
from unioncam.viz import grid

DEFAULT_PHOTOS = "chelsea,coffee,motorcycle,grace_hopper"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="comma-separated sample photo names")
    parser.add_argument("--method", default="all")
    args = parser.parse_args()
    paths = sample_photo_paths(args.photos.split(","))
    rc = cli_main(["explain", *map(str, paths.values()), "--model", "efficientnet_lite0",
                   "--method", args.method, "--out", args.out])
    if rc != 0:
        return rc
    methods = parse_methods(args.method)
    out = Path(args.out)
    cells = [[Image.open(out / f"{p.stem}_{m}.png") for m in methods] for p in paths.values()]
    grid(cells, list(paths), methods).save(out / "grid.png")
    print(f"grid: {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
