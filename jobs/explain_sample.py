"""Every method on the bundled real photos with the real EfficientNet-Lite0; overlays to --out.

Run: ``python jobs/explain_sample.py [--out out/] [--photos chelsea,coffee,...]`` (``make demo``).
"""

from __future__ import annotations

import argparse
import sys

from unioncam.cli import main as cli_main
from unioncam.data.sample import sample_photo_paths

DEFAULT_PHOTOS = "chelsea,coffee,motorcycle,grace_hopper"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="comma-separated sample photo names")
    parser.add_argument("--method", default="all")
    args = parser.parse_args()
    paths = sample_photo_paths(args.photos.split(","))
    return cli_main(["explain", *map(str, paths.values()), "--model", "efficientnet_lite0",
                     "--method", args.method, "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
