"""Small shard sets for the service tests: real sample photos, labels 0-9 (TinyCNN's classes)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from unioncam.data.sample import sample_photo_paths
from unioncam.data.shards import Sample, write_shards


def photo_bytes(n: int) -> list[tuple[str, bytes]]:
    """``n`` distinct JPEGs: the sample photos, then flipped/rotated variants of them."""
    photos = list(sample_photo_paths().items())
    out = []
    for i in range(n):
        name, path = photos[i % len(photos)]
        img = Image.open(path).convert("RGB").resize((96, 80))
        img = img.rotate(90 * (i // len(photos)), expand=True)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((f"{name}_{i:03d}", buf.getvalue()))
    return out


def make_shards(out: Path, n_images: int, shard_size: int, boxes: bool = False, prefix: str = "t",
                bad: bool = False) -> list[Path]:
    """Write ``n_images`` labelled samples (label ``i % 10``; a centre box when ``boxes``).

    ``bad`` appends three broken samples to the last shard: a corrupt JPEG, an image with no label
    and a label that is not a number.
    """
    samples = []
    for i, (key, data) in enumerate(photo_bytes(n_images)):
        meta = {"boxes": [[20.0, 16.0, 76.0, 64.0]]} if boxes else {}
        samples.append(Sample(key, data, "jpg", i % 10, meta))
    if bad:
        good = samples[0].image
        samples += [Sample("corrupt", b"\xff\xd8\xff\xe0 not really a jpeg", "jpg", 1),
                    Sample("unlabelled", good, "jpg", None),
                    Sample("badlabel", good, "jpg", None, {})]
    manifest = write_shards(samples, out, prefix, shard_size)
    if bad:  # give "badlabel" a non-numeric .cls by rewriting the last shard's member
        import tarfile

        last = out / manifest["shards"][-1]["name"]
        with tarfile.open(last) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(last, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, payload in members:
                tar.addfile(m, io.BytesIO(payload))
                if m.name == "badlabel.json":
                    info = tarfile.TarInfo("badlabel.cls")
                    info.size = 5
                    tar.addfile(info, io.BytesIO(b"seven"))
    return [out / s["name"] for s in manifest["shards"]]


def softmax_prob(model, x, target: int) -> float:
    """``f_c(x)`` computed directly (no unioncam helper): softmax of one forward in float64."""
    import torch

    with torch.no_grad():
        logits = model(x[None]).double()
    return float(torch.softmax(logits, dim=1)[0, target])


__all__ = ["make_shards", "photo_bytes", "softmax_prob"]
