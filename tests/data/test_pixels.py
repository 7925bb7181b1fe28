"""Pixel formats: one rule per PIL mode (unioncam.viz.pil_to_tensor), checked on known pixel values, and
decompression bombs refused from the header with bounded memory."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from unioncam.data.sample import sample_photo_paths
from unioncam.data.shards import Sample, decode_sample, iter_samples, write_shards
from unioncam.viz import MAX_PIXELS, ImageError, load_image, pil_to_tensor


def roundtrip(img: Image.Image, fmt: str) -> Image.Image:
    """``img`` saved as ``fmt`` and opened again (as the reader would see the file)."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out


def tensor(img: Image.Image) -> np.ndarray:
    """``pil_to_tensor`` at the image's own size (an identity resize) as an ``H×W×3`` float64 array."""
    out = pil_to_tensor(img, (img.height, img.width))
    assert out.shape == (3, img.height, img.width) and out.dtype == torch.float32
    return out.permute(1, 2, 0).double().numpy()


def gray3(values) -> np.ndarray:
    """Grayscale values replicated to 3 channels."""
    arr = np.asarray(values, dtype=np.float32) if not isinstance(values, np.ndarray) else values
    return np.repeat(arr[..., None], 3, axis=-1)


def u8(values) -> np.ndarray:
    """8-bit values / 255, computed in float32 as the tensor is."""
    return np.asarray(values, dtype=np.float32) / np.float32(255)


# --- 8-bit modes: / 255 ---------------------------------------------------------------------------------------

def test_l_is_over_255_and_replicated():
    values = np.array([[0, 51], [128, 255]], dtype=np.uint8)
    img = roundtrip(Image.fromarray(values), "PNG")
    assert img.mode == "L"
    np.testing.assert_array_equal(tensor(img), gray3(values.astype(np.float32) / 255))


def test_mode_1_is_zero_or_one():
    img = Image.new("1", (2, 2))
    img.putdata([0, 1, 1, 0])
    img = roundtrip(img, "PNG")
    assert img.mode == "1"
    np.testing.assert_array_equal(tensor(img), gray3([[0, 1], [1, 0]]))


def test_rgb_is_over_255():
    values = np.array([[[255, 0, 10], [20, 30, 40]], [[1, 2, 3], [128, 64, 32]]], dtype=np.uint8)
    img = roundtrip(Image.fromarray(values), "PNG")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(tensor(img), values.astype(np.float32) / 255)


def test_rgbx_drops_the_pad_band():
    img = Image.frombytes("RGBX", (2, 1), bytes([10, 20, 30, 99, 40, 50, 60, 7]))
    np.testing.assert_array_equal(tensor(img), np.array([[[10, 20, 30], [40, 50, 60]]], np.float32) / 255)


def test_p_goes_through_its_palette():
    img = Image.new("P", (2, 2))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    img.putdata([1, 2, 3, 0])
    img = roundtrip(img, "PNG")
    assert img.mode == "P" and "transparency" not in img.info
    want = np.array([[[255, 0, 0], [0, 128, 255]], [[10, 20, 30], [0, 0, 0]]], np.float32) / 255
    np.testing.assert_array_equal(tensor(img), want)


def test_p_transparency_is_composited_on_black():
    img = Image.new("P", (2, 1))
    img.putpalette([200, 100, 50, 10, 20, 30] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    img.info["transparency"] = 0  # palette entry 0 fully transparent
    img = roundtrip(img, "PNG")
    assert img.mode == "P" and img.info.get("transparency") == 0
    np.testing.assert_array_equal(tensor(img), np.array([[[0, 0, 0], [10, 20, 30]]], np.float32) / 255)


def test_rgb_colour_key_transparency_is_composited_on_black():
    img = roundtrip(Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)), "PNG")
    img.info["transparency"] = (1, 2, 3)  # PNG tRNS: this colour is transparent
    img = roundtrip(img, "PNG")
    assert img.mode == "RGB" and img.info.get("transparency") == (1, 2, 3)
    np.testing.assert_array_equal(tensor(img), np.array([[[0, 0, 0], [4, 5, 6]]], np.float32) / 255)


def test_rgba_and_la_alpha_is_composited_on_black():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]], [[200, 100, 50, 128], [255, 255, 255, 51]]], np.uint8)
    img = roundtrip(Image.fromarray(rgba), "PNG")
    assert img.mode == "RGBA"
    want = rgba[..., :3] * (rgba[..., 3:] / 255) / 255  # c · α
    np.testing.assert_allclose(tensor(img), want, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(tensor(img)[0], u8([[200, 100, 50], [0, 0, 0]]))

    la = np.array([[[200, 255], [200, 0]], [[200, 128], [255, 51]]], np.uint8)
    img = roundtrip(Image.fromarray(la), "PNG")
    assert img.mode == "LA"
    np.testing.assert_allclose(tensor(img), gray3(la[..., 0] * (la[..., 1] / 255) / 255), atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(tensor(img)[0], gray3(u8([200, 0])))


def test_pa_alpha_is_composited_on_black():
    img = Image.frombytes("PA", (2, 1), bytes([1, 255, 1, 0]))
    img.putpalette([0, 0, 0, 30, 60, 90] + [0] * (256 * 3 - 6))
    np.testing.assert_array_equal(tensor(img), np.array([[[30, 60, 90], [0, 0, 0]]], np.float32) / 255)


def test_premultiplied_alpha_keeps_the_colour_bands():
    rgba = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 25, 128, 7, 8, 9, 0]))
    np.testing.assert_array_equal(tensor(rgba), np.array([[[100, 50, 25], [7, 8, 9]]], np.float32) / 255)
    la = Image.frombytes("La", (2, 1), bytes([100, 128, 0, 0]))
    np.testing.assert_array_equal(tensor(la), gray3(u8([[100, 0]])))


def test_cmyk_ycbcr_hsv_lab_by_pils_conversion():
    cmyk = roundtrip(Image.frombytes("CMYK", (4, 1), bytes([0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255, 255, 0])),
                     "TIFF")
    assert cmyk.mode == "CMYK"  # white, black, cyan, red
    want = np.array([[[255, 255, 255], [0, 0, 0], [0, 255, 255], [255, 0, 0]]], np.float32) / 255
    np.testing.assert_array_equal(tensor(cmyk), want)
    ycc = Image.frombytes("YCbCr", (2, 1), bytes([255, 128, 128, 128, 128, 128]))
    np.testing.assert_array_equal(tensor(ycc), np.array([[[255, 255, 255], [128, 128, 128]]], np.float32) / 255)
    hsv = Image.frombytes("HSV", (2, 1), bytes([0, 255, 255, 0, 0, 255]))
    np.testing.assert_array_equal(tensor(hsv), np.array([[[255, 0, 0], [255, 255, 255]]], np.float32) / 255)
    lab = roundtrip(Image.frombytes("LAB", (3, 1), bytes([255, 0, 0, 0, 0, 0, 128, 0, 0])), "TIFF")
    assert lab.mode == "LAB"  # L* = 100, 0, 50 (a* = b* = 0): white, black, sRGB mid grey 119
    np.testing.assert_allclose(tensor(lab), np.array([[[1, 1, 1], [0, 0, 0], [119 / 255] * 3]]), atol=2 / 255)
    for img in (cmyk, ycc, hsv, lab):  # the rule is PIL's own conversion
        np.testing.assert_array_equal(tensor(img), np.asarray(img.convert("RGB"), np.float32) / 255)


# --- high bit depth: I;16*, I, F ------------------------------------------------------------------------------

def test_i16_is_over_65535():
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    img = roundtrip(Image.fromarray(values), "TIFF")
    assert img.mode == "I;16"
    np.testing.assert_allclose(tensor(img), gray3(values / 65535), rtol=1e-6, atol=1e-7)
    png = roundtrip(Image.fromarray(values), "PNG")
    assert png.mode in ("I;16", "I")  # Pillow >= 10.?: I;16; older: I. The same rule either way
    np.testing.assert_allclose(tensor(png), gray3(values / 65535), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
def test_i16_byte_orders(mode):
    order = {"I;16B": ">", "I;16L": "<", "I;16N": "="}[mode]
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    img = Image.frombytes(mode, (4, 1), values.astype(order + "u2").tobytes())
    assert img.mode == mode
    np.testing.assert_allclose(tensor(img), gray3(values / 65535), rtol=1e-6, atol=1e-7)


def test_i_is_over_65535_and_clipped():
    values = np.array([[-5, 200, 1000], [32768, 65535, 70000]], dtype=np.int32)
    img = roundtrip(Image.fromarray(values), "TIFF")
    assert img.mode == "I"
    want = gray3(np.clip(values / 65535, 0, 1))
    np.testing.assert_allclose(tensor(img), want, rtol=1e-6, atol=1e-7)


def test_dark_16bit_tiff_is_dark_whether_stored_as_i_or_i16():
    """The issue: max <= 255 in mode I read as 8-bit (78 % grey), while the same pixels as I;16 were ~0."""
    for level in (200, 1000):
        pixels = np.full((4, 4), level)
        as_i16 = roundtrip(Image.fromarray(pixels.astype(np.uint16)), "TIFF")
        as_i = roundtrip(Image.fromarray(pixels.astype(np.int32)), "TIFF")
        assert (as_i16.mode, as_i.mode) == ("I;16", "I")
        a, b = tensor(as_i16), tensor(as_i)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, level / 65535, rtol=1e-6)


def test_float_tiff_is_taken_as_0_to_1_and_clipped():
    img = roundtrip(Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32)), "TIFF")
    assert img.mode == "F"
    np.testing.assert_array_equal(tensor(img), np.full((3, 3, 3), 0.5))  # not black
    values = np.array([[0.0, 0.25, 1.0], [-0.5, 2.0, 1e-4]], dtype=np.float32)
    img = roundtrip(Image.fromarray(values), "TIFF")
    np.testing.assert_array_equal(tensor(img), gray3(np.clip(values, 0, 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_raise(bad):
    values = np.array([[0.5, bad]], dtype=np.float32)
    img = roundtrip(Image.fromarray(values), "TIFF")
    with pytest.raises(ValueError, match="non-finite pixel values"):
        pil_to_tensor(img, (1, 2))


def test_unknown_mode_raises_naming_it():
    fake = types.SimpleNamespace(mode="XYZ;42", info={}, size=(1, 1), width=1, height=1)
    with pytest.raises(ValueError, match=r"XYZ;42"):
        pil_to_tensor(fake, (1, 1))  # type: ignore[arg-type]


# --- resizing --------------------------------------------------------------------------------------------------

def old_pil_to_tensor_8bit(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The implementation before per-mode rules, for 8-bit modes (the numbers must not change)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def test_8bit_resize_is_unchanged_on_real_photos():
    pytest.importorskip("skimage")
    for name, path in sample_photo_paths(["chelsea", "camera", "horse", "grace_hopper"]).items():
        with Image.open(path) as img:
            img.load()
            for size in ((224, 224), (97, 131)):
                assert torch.equal(pil_to_tensor(img, size), old_pil_to_tensor_8bit(img, size)), (name, img.mode, size)


def test_high_depth_is_resized_in_float():
    img = Image.fromarray(np.full((4, 6), 1000, dtype=np.uint16))
    out = pil_to_tensor(img, (8, 3))
    assert out.shape == (3, 8, 3)
    torch.testing.assert_close(out, torch.full((3, 8, 3), 1000 / 65535), rtol=1e-6, atol=0)  # not 4/255
    ramp = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    out = pil_to_tensor(ramp, (4, 4))
    assert float(out.min()) >= 0 and float(out.max()) <= 1 and len(torch.unique(out)) == 16


# --- through the shard reader ----------------------------------------------------------------------------------

def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


def test_shard_reader_applies_the_rules(tmp_path):
    samples = [Sample("float", tiff_bytes(np.full((4, 4), 0.5, np.float32)), "tif", 1),
               Sample("dark_i", tiff_bytes(np.full((4, 4), 1000, np.int32)), "tif", 2),
               Sample("dark_i16", tiff_bytes(np.full((4, 4), 1000, np.uint16)), "tif", 3),
               Sample("nan", tiff_bytes(np.array([[np.nan, 0.5]], np.float32)), "tiff", 4)]
    write_shards(samples, tmp_path, "px", 10)
    records = {r["key"]: r for r in iter_samples(tmp_path / "px-000000.tar", size=(8, 8))}
    assert len(records) == 4
    torch.testing.assert_close(records["float"]["image"], torch.full((3, 8, 8), 0.5))
    for key in ("dark_i", "dark_i16"):
        torch.testing.assert_close(records[key]["image"], torch.full((3, 8, 8), 1000 / 65535), rtol=1e-6, atol=0)
    assert "image" not in records["nan"] and "non-finite pixel values" in records["nan"]["error"]
    assert records["nan"]["error"].startswith("cannot decode nan.tiff")


# --- decompression bombs ---------------------------------------------------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of ``width × height`` zeros, compressed row by row (never in memory whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = bytes(width + 1) * 500  # each row: filter byte 0, then zeros
    idat = [packer.compress(rows) for _ in range(height // 500)]
    idat += [packer.compress(bytes(width + 1) * (height % 500)), packer.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 255, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BOMB_SIDE = 10_000  # 10**8 pixels: over MAX_PIXELS, under 2× PIL's limit, where PIL only warns and decodes


def test_bomb_is_between_our_limit_and_pils_error():
    """The bomb of the memory test is one PIL alone would decode (a warning only): the limit is ours."""
    bomb = png_bomb(BOMB_SIDE, BOMB_SIDE)
    assert len(bomb) < 200_000 and MAX_PIXELS < BOMB_SIDE**2 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        img = Image.open(io.BytesIO(bomb))
    assert img.size == (BOMB_SIDE, BOMB_SIDE)
    img.close()


MEASURE = """
import json, resource, sys, warnings
from unioncam.data.shards import iter_samples
warnings.simplefilter("ignore")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
records = list(iter_samples(sys.argv[1], size=(16, 16)))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before,
                  "records": [{k: r[k] for k in ("key", "error") if k in r} for r in records]}))
"""


def test_decompression_bomb_is_an_error_row_with_bounded_memory(tmp_path):
    """A fresh process (so the peak RSS is its own) reads a shard holding a 10⁸-pixel PNG bomb between two good
    samples: the bomb is an error row, the others decode, and the peak RSS grows by < 100 MB (decoding it would
    take 100 MB as L and 400 MB as RGB)."""
    samples = [Sample("before", small_png(), "png", 1), Sample("bomb", png_bomb(BOMB_SIDE, BOMB_SIDE), "png", 2),
               Sample("after", small_png(), "png", 3)]
    write_shards(samples, tmp_path, "bomb", 10)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "bomb-000000.tar")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    records = {r["key"]: r for r in result["records"]}
    assert list(records) == ["before", "bomb", "after"]
    assert "error" not in records["before"] and "error" not in records["after"]
    error = records["bomb"]["error"]
    assert error.startswith("bomb.png: image of 10000×10000 = 100000000 pixels exceeds the limit of 89478485")
    assert "decompression bomb" in error
    assert result["growth_kib"] < 100 * 1024, result["growth_kib"]


def test_bomb_refused_even_when_pils_own_limit_is_off(tmp_path, monkeypatch):
    """30000×30000 (a few hundred KB): PIL refuses it itself by default; with its limit off, ours still holds."""
    bomb = png_bomb(30_000, 30_000)
    write_shards([Sample("huge", bomb, "png", 1)], tmp_path, "huge", 10)
    [default] = iter_samples(tmp_path / "huge-000000.tar")
    assert "huge.png" in default["error"] and "decompression bomb" in default["error"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    [record] = iter_samples(tmp_path / "huge-000000.tar")
    assert record["key"] == "huge" and "exceeds the limit of 89478485" in record["error"]
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_sample("huge", {"png": bomb, "cls": b"1"}, (16, 16))
    (tmp_path / "huge.png").write_bytes(bomb)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(tmp_path / "huge.png", (16, 16))


def test_image_at_the_limit_is_not_refused():
    """The limit is on width × height > MAX_PIXELS; a header exactly at it passes the check (no decode here)."""
    from unioncam.viz import check_pixels

    check_pixels(types.SimpleNamespace(size=(MAX_PIXELS, 1)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decompression bomb"):
        check_pixels(types.SimpleNamespace(size=(MAX_PIXELS + 1, 1)))  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_pixels(Image.new("L", (4, 4)))


def test_load_image_takes_an_int_size_and_turns_photos_upright(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) is
    explained as it is shown; ``load_image(path, 32)`` means 32×32."""
    from unioncam.viz import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20, 0] = 255
    stored[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, quality=100, exif=exif)
    shown = load_image(path, (40, 20))  # upright: 20 wide, 40 high; rotated clockwise, red is on top
    assert shown.shape == (3, 40, 20)
    assert shown[0, :15].mean() > 0.9 and shown[2, :15].mean() < 0.1
    assert shown[2, 25:].mean() > 0.9 and shown[0, 25:].mean() < 0.1
    square = load_image(path, 32)
    assert square.shape == (3, 32, 32) and square[0, :12].mean() > 0.9
