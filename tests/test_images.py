"""Image decoding: every odd mode ends as RGB uint8, every bad input as ImageDecodeError, sizes as Qwen2-VL."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFile

from umarvel_ray.data import images
from umarvel_ray.data.images import ImageDecodeError, decode_image, encode_png, load_image, smart_resize


def _bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, **kw)
    return ei.value


def test_alpha_composited_on_white():
    a = np.zeros((56, 56, 4), np.uint8)
    a[:, :28] = (200, 10, 10, 255)  # opaque red left half, fully transparent black right half
    out = decode_image(_bytes(Image.fromarray(a, "RGBA")))
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8
    assert (out[:, 40:] == 255).all()  # transparent -> white, not black
    assert (out[:, :20] == (200, 10, 10)).all()


def test_la_and_palette_transparency_on_white():
    la = np.zeros((56, 56, 2), np.uint8)
    la[..., 0] = 30
    la[:28, :, 1] = 255
    out = decode_image(_bytes(Image.fromarray(la, "LA")))
    assert (out[:20] == 30).all() and (out[40:] == 255).all()

    p = Image.new("P", (56, 56), 0)
    p.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    p.paste(1, (0, 0, 56, 28))  # top half palette index 1 (green), bottom index 0 (transparent)
    out = decode_image(_bytes(p, transparency=0))
    assert (out[:20] == (0, 128, 0)).all()
    assert (out[40:] == 255).all()
    # the same palette without transparency keeps black
    assert (decode_image(_bytes(p))[40:] == 0).all()


def test_cmyk_and_grayscale():
    cmyk = Image.new("CMYK", (56, 56), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_bytes(cmyk, "TIFF"))
    assert (out == (255, 0, 0)).all()
    g = decode_image(_bytes(Image.new("L", (56, 56), 77)))
    assert g.shape == (56, 56, 3) and (g == 77).all()
    b = decode_image(_bytes(Image.new("1", (56, 56), 1)))
    assert (b == 255).all()


def test_16bit_gradient_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 56).round().astype(np.uint16)
    im = Image.fromarray(np.tile(ramp, (56, 1)))
    assert im.mode.startswith("I;16")
    out = decode_image(_bytes(im))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out) >= 0).all()
    # mid-grey stays mid-grey (PIL's clipping convert would give 255)
    assert abs(out[28] - 255 * int(ramp[28]) / 65535) <= 1
    # 32-bit "I" holding 16-bit data is scaled the same way
    out_i = decode_image(_bytes(im.convert("I"), "TIFF"))[0, :, 0].astype(int)
    assert np.abs(out_i - out).max() <= 1


def test_truncated_and_not_an_image():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = _bytes(Image.fromarray(arr), fmt)
        e = _reason(data[: len(data) // 2])
        assert (e.reason, e.kind) == ("truncated image", "truncated")
    assert _reason(b"hello, I am not an image").reason == "not an image"
    assert _reason(b"").kind == "empty"


def test_bomb_refused_before_decoding(monkeypatch):
    data = _bytes(Image.new("L", (3000, 2000), 0))  # a few KB of zeros that decode to 6 MP
    assert len(data) < 50_000

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    e = _reason(data, max_source_pixels=1_000_000)
    assert (e.reason, e.kind) == ("decompression bomb: 3000x2000 px > limit 1000000", "bomb")


@pytest.mark.parametrize("limit", [1_000, 3_000])
def test_pil_bomb_warning_and_error_become_errors(monkeypatch, limit):
    # 60x60 = 3600 px: above PIL's warning limit (3000) and above its 2x error limit (2000) respectively
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    e = _reason(_bytes(Image.new("RGB", (60, 60))))
    assert e.kind == "bomb" and e.reason.startswith("decompression bomb")


def test_extreme_aspect_ratio_rejected():
    e = _reason(_bytes(Image.new("RGB", (402, 2))))
    assert e.kind == "aspect" and "402x2" in e.reason
    with pytest.raises(ValueError):
        smart_resize(2, 402)


@pytest.mark.parametrize(
    ("hw", "want"),
    [
        ((256, 256), (252, 252)),  # round to nearest multiple
        ((256, 384), (252, 392)),
        ((2000, 1500), (560, 420)),  # shrink into max_pixels with floor
        ((10, 10), (56, 56)),  # grow into min_pixels with ceil
        ((10, 1000), (28, 1008)),  # max(factor, round(...)) of qwen_vl_utils keeps 28 rows
    ],
)
def test_smart_resize_known_values(hw, want):
    assert smart_resize(*hw) == want


def test_sizes_multiple_of_28_within_budget():
    rng = random.Random(0)
    lo, hi = 4 * 28 * 28, 64 * 28 * 28
    for _ in range(300):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(h, w) / min(h, w) > 200:
            continue
        th, tw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        assert th % 28 == 0 and tw % 28 == 0
        assert lo <= th * tw <= hi, (h, w, th, tw)
        assert abs(math.log((th / tw) / (h / w))) < math.log(2) or min(th, tw) == 28
    for h, w in [(37, 91), (300, 500), (90, 90)]:
        out = decode_image(_bytes(Image.new("RGB", (w, h), (9, 99, 199))), min_pixels=lo, max_pixels=hi)
        assert out.shape == (*smart_resize(h, w, min_pixels=lo, max_pixels=hi), 3)
        assert (out == (9, 99, 199)).all()


def test_corrupted_bytes_never_crash():
    rng = np.random.default_rng(1)
    data = _bytes(Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)), "JPEG")
    r = random.Random(1)
    kinds = set()
    for _ in range(60):
        b = bytearray(data)
        for _ in range(r.randint(1, 12)):
            b[r.randrange(len(b))] = r.randrange(256)
        try:
            out = decode_image(bytes(b))
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        except ImageDecodeError as e:
            kinds.add(e.kind)
    assert kinds <= {"truncated", "corrupt", "not_image", "aspect", "bomb", "empty"}


def test_load_image_and_missing(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encode_png(np.full((28, 56, 3), 7, np.uint8)))
    out = load_image(tmp_path, "imgs/a.png")
    assert out.shape == (56, 84, 3) and (out == 7).all()  # 28x56 grows to reach 4*28*28 px
    with pytest.raises(ImageDecodeError) as ei:
        load_image(tmp_path, "imgs/missing.png")
    assert ei.value.reason == f"missing image: {tmp_path / 'imgs/missing.png'}"
    assert ei.value.kind == "missing"


def test_encode_png_round_trip():
    arr = np.random.default_rng(2).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    assert (decode_image(encode_png(arr)) == arr).all()
    with pytest.raises(ValueError):
        encode_png(arr.astype(np.float32))
    assert images.MAX_PIXELS == 300 * 28 * 28
