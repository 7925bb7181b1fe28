"""Real photos shipped inside installed packages (scikit-image, matplotlib): the offline sample.

Nothing is downloaded: each photo is a file inside a package's own data folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name → (package, path inside the package)
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),
    "horse": ("skimage", "data/horse.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def sample_photo_paths(names: list[str] | None = None) -> dict[str, Path]:
    """Paths of the sample photos ``names`` (default: all), in that order.

    Raises:
        FileNotFoundError: a package is not installed (``pip install 'unioncam[demo]'``) or lacks
            the file.
    """
    paths: dict[str, Path] = {}
    for name in names or list(SAMPLE_PHOTOS):
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
