"""Image loading and heat-map overlays (PIL only; no matplotlib needed)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


class ImageError(ValueError):
    """An image file that cannot be read or decoded."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grayscale, palette, CMYK and 16-bit images included.

    16-bit grayscale (``I;16``/``I``) is scaled by its bit depth, not clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image, size: tuple[int, int]) -> Tensor:
    """RGB PIL image → ``3×H×W`` float tensor in ``[0, 1]`` at ``size`` = (H, W), bilinear resize."""
    img = to_rgb(img).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | os.PathLike[str], size: tuple[int, int]) -> Tensor:
    """Read an image file as a ``3×H×W`` tensor in ``[0, 1]`` resized to ``size``.

    Raises:
        ImageError: missing file or undecodable data, with the path in the message.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img, size)
    except FileNotFoundError as exc:
        raise ImageError(f"no such image: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image {path}: {exc}") from exc


def jet(values: Tensor) -> Tensor:
    """The 'jet' colormap: ``H×W`` values in ``[0, 1]`` → ``3×H×W`` RGB in ``[0, 1]``.

    ``r = clip(1.5 − |4v − 3|)``, ``g = clip(1.5 − |4v − 2|)``, ``b = clip(1.5 − |4v − 1|)``.
    """
    v = values.clamp(0, 1)[None]
    centers = torch.tensor([3.0, 2.0, 1.0], dtype=v.dtype, device=v.device)[:, None, None]
    return (1.5 - (4 * v - centers).abs()).clamp(0, 1)


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend a ``3×H×W`` image with the jet-colored ``H×W`` map: ``(1−α)·image + α·jet(map)``."""
    if image.shape[-2:] != cam.shape[-2:]:
        raise ValueError(f"map {tuple(cam.shape)} and image {tuple(image.shape)} differ in size")
    mixed = (1 - alpha) * image.float().cpu() + alpha * jet(cam.float().cpu())
    arr = (mixed.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Tile equal-sized images in rows and columns, with labels above columns and left of rows."""
    from PIL import ImageDraw

    h, w = cells[0][0].height, cells[0][0].width
    left, top = 110, 18
    canvas = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + 4, 3), label, fill="black")
    for i, (label, row) in enumerate(zip(row_labels, cells, strict=True)):
        draw.text((4, top + i * h + h // 2), label, fill="black")
        for j, cell in enumerate(row):
            canvas.paste(cell.resize((w, h)), (left + j * w, top + i * h))
    return canvas
