"""Image loading and heat-map overlays (PIL only; no matplotlib needed)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor


class ImageError(ValueError):
    """An image file that cannot be read or decoded."""


#: What PIL may open an image as: raster formats PIL decodes itself (never EPS, which runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "WEBP", "TIFF", "GIF")
#: The member extensions a shard's image may have: one per spelling of :data:`IMAGE_FORMATS` (an
#: animated GIF gives its first frame, as in ``unioncam explain``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "webp", "tif", "tiff", "gif")
#: The most pixels (width × height) an image may claim before it is decoded: PIL's own default
#: ``Image.MAX_IMAGE_PIXELS`` (2**30 / 4 / 3, i.e. 256 MiB as 24-bit RGB), checked on the header, so a
#: decompression bomb is refused without allocating it; PIL itself only warns up to twice this.
MAX_PIXELS = 89_478_485

_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")  # PIL's convert("RGB")
_STRAIGHT_ALPHA = ("LA", "PA", "RGBA")  # alpha composited on black
_PREMULTIPLIED = ("La", "RGBa")  # colour already multiplied by alpha: that is the composite on black
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit: / 65535


def check_pixels(img: Image.Image) -> None:
    """Refuse an image whose header claims more than :data:`MAX_PIXELS` pixels (call before ``load()``).

    Raises:
        ValueError: the claimed size, the limit and why.
    """
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"image of {width}×{height} = {width * height} pixels exceeds the limit of {MAX_PIXELS} "
                         "pixels (a decompression bomb?); refused before decoding")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit PIL image (any mode of :func:`pil_to_tensor`'s table but ``I;16*``, ``I`` and ``F``) as
    8-bit RGB, transparency composited on black.

    Raises:
        ValueError: a high-bit-depth or unknown mode (the message names it).
    """
    mode = img.mode
    if mode in _PREMULTIPLIED:
        arr = np.asarray(img)[..., :-1]
        return Image.fromarray(np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr))
    if mode not in _EIGHT_BIT and mode not in _STRAIGHT_ALPHA:
        raise ValueError(f"unsupported PIL image mode {mode!r} for 8-bit RGB conversion")
    if mode in _STRAIGHT_ALPHA or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _high_depth(img: Image.Image) -> np.ndarray:
    """A ``I;16*``, ``I`` or ``F`` image as an ``H×W`` float32 array in ``[0, 1]`` (the table's rules)."""
    if img.mode == "F":
        floats = np.asarray(img, dtype=np.float32)
        if not np.isfinite(floats).all():
            raise ValueError("non-finite pixel values (NaN or ±inf) in a mode F (float) image")
        return np.clip(floats, 0.0, 1.0)
    scaled = np.asarray(img).astype(np.float64) / 65535.0
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def pil_to_tensor(img: Image.Image, size: tuple[int, int]) -> Tensor:
    """A PIL image → ``3×H×W`` float tensor in ``[0, 1]`` at ``size`` = (H, W), bilinear resize.

    One rule per PIL mode, never a guess from the pixel values:

    =========================================  ====================================================================
    mode                                       rule
    =========================================  ====================================================================
    ``L``, ``RGB``, ``RGBX``                   ``v / 255`` (``RGBX``: the pad band dropped)
    ``1``                                      0 → 0, 1 → 1
    ``P``                                      through its palette to RGB, ``/ 255``
    ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``      PIL's conversion to 8-bit RGB (no ICC profile), ``/ 255``
    ``RGBA``, ``LA``, ``PA``                   composited on black (``c · α``), ``/ 255``; so is a ``1``, ``L``,
                                               ``P`` or ``RGB`` image with a transparency key (PNG ``tRNS``)
    ``RGBa``, ``La`` (premultiplied alpha)     the colour bands as stored (already the composite on black)
    ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``  unsigned 16-bit: ``v / 65535``
    ``I`` (32-bit signed)                      ``v / 65535``, clipped to ``[0, 1]``: PIL opens 16-bit data as ``I``
                                               (signed 16-bit TIFFs, 16-bit PNGs in older Pillow), so the range
                                               is 16-bit whatever the values; true 32-bit data saturates
    ``F`` (32-bit float)                       taken as already in ``[0, 1]``, clipped; NaN or ±inf: ``ValueError``
    anything else                              ``ValueError`` naming the mode
    =========================================  ====================================================================

    Grayscale is replicated to 3 channels. 8-bit modes are resized as 8-bit RGB (PIL's bilinear);
    ``I;16*``, ``I`` and ``F`` are resized as float (PIL's bilinear on mode ``F``), keeping their precision.

    Raises:
        ValueError: an unknown mode, or non-finite values in a float image.
    """
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        plane = Image.fromarray(_high_depth(img)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        gray = torch.from_numpy(np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0))
        return gray.expand(3, -1, -1).contiguous()
    img = to_rgb(img).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | os.PathLike[str], size: int | tuple[int, int]) -> Tensor:
    """Read an image file as a ``3×H×W`` tensor in ``[0, 1]`` resized to ``size`` (``224`` means
    ``(224, 224)``), turned upright by its EXIF orientation (a phone photo shows as taken).

    Only :data:`IMAGE_FORMATS` are opened. Shards are decoded as stored, without EXIF rotation, as
    torchvision's dataset loaders do (:func:`unioncam.data.shards.decode_sample`), so dataset
    numbers stay comparable with published ones.

    Raises:
        ImageError: missing file or undecodable data, with the path in the message.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            check_pixels(img)
            img.load()
            upright = ImageOps.exif_transpose(img)
            return pil_to_tensor(upright if upright is not None else img, hw)
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


#: The width in pixels of the colour bar :func:`grid` draws under the tiles (the jet scale, 0 → 1).
COLORBAR_WIDTH = 256


def colorbar(width: int = COLORBAR_WIDTH, height: int = 12) -> Image.Image:
    """The jet scale as a ``width×height`` RGB strip: column ``j`` is ``jet(j / (width − 1))``, so
    the left end is a map's 0 and the right end its 1 (the colours :func:`overlay` blends in)."""
    ramp = jet(torch.linspace(0.0, 1.0, width)[None].expand(height, width))
    arr = (ramp * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
         colorbar_label: str | None = None) -> Image.Image:
    """Tile images in rows and columns, with labels above columns and left of rows (a label may hold
    several lines, separated by ``\\n``).

    Each image keeps its size (so each keeps its aspect ratio): a column is as wide as its widest
    image, a row as tall as its tallest, and each image is centred in its slot. ``colorbar_label``
    adds the jet colour bar (:func:`colorbar`, :data:`COLORBAR_WIDTH` wide) under the tiles, with
    "0" and "1" at its ends and the label beside it.
    """
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size_of(text: str) -> tuple[int, int]:
        box = measure.multiline_textbbox((0, 0), text, spacing=2) if text else (0, 0, 0, 0)
        return int(box[2] - box[0]), int(box[3] - box[1])

    col_w = [max(row[j].width for row in cells) + 4 for j in range(len(col_labels))]  # 4 px between images
    col_w = [max(w, size_of(label)[0] + 8) for w, label in zip(col_w, col_labels, strict=True)]
    row_h = [max(max(c.height for c in row) + 4, size_of(label)[1] + 8)
             for row, label in zip(cells, row_labels, strict=True)]
    left = max([110, *(size_of(label)[0] + 12 for label in row_labels)])
    top = max([18, *(size_of(label)[1] + 8 for label in col_labels)])
    bar_h = 12 if colorbar_label is not None else 0
    bottom = bar_h + 26 if colorbar_label is not None else 0
    width = left + sum(col_w)
    if colorbar_label is not None:
        width = max(width, left + 16 + COLORBAR_WIDTH + 16 + size_of(colorbar_label)[0] + 8)
    canvas = Image.new("RGB", (width, top + sum(row_h) + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    xs = [left + sum(col_w[:j]) for j in range(len(col_w))]
    for j, label in enumerate(col_labels):
        draw.multiline_text((xs[j] + 4, 3), label, fill="black", spacing=2)
    y = top
    for label, row, h in zip(row_labels, cells, row_h, strict=True):
        draw.multiline_text((4, y + max(0, (h - size_of(label)[1]) // 2)), label, fill="black", spacing=2)
        for j, cell in enumerate(row):
            canvas.paste(cell, (xs[j] + (col_w[j] - cell.width) // 2, y + (h - cell.height) // 2))
        y += h
    if colorbar_label is not None:
        bar_y = y + 10
        draw.text((left, bar_y), "0", fill="black")
        canvas.paste(colorbar(COLORBAR_WIDTH, bar_h), (left + 12, bar_y))
        draw.text((left + 16 + COLORBAR_WIDTH, bar_y), "1", fill="black")
        draw.text((left + 28 + COLORBAR_WIDTH, bar_y), colorbar_label, fill="black")
    return canvas
