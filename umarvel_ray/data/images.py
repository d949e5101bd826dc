"""Image bytes -> RGB uint8 arrays sized for Qwen2-VL, with every failure turned into a countable reason.

Embedding and training jobs decode millions of web images; one truncated JPEG or a
decompression bomb must cost one rejected row, never a crashed worker or an exhausted node.
So the source size is checked against a pixel limit from the header alone, before any pixel is
decoded, and every decoder failure becomes `ImageDecodeError(reason)`. Resizing follows Qwen2-VL's
`smart_resize` (qwen_vl_utils) so the processor downstream sees the exact size it would pick
itself and does no second resize.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 300 * 28 * 28
MAX_RATIO = 200
# Refuse sources above this many pixels before decoding (~64 MP; M-BEIR images are ~256 px short side).
MAX_SOURCE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is the message, `kind` a stable category to count.

    Kinds: empty, not_image, truncated, corrupt, bomb, aspect, unsupported, missing, unreadable.
    """

    def __init__(self, reason: str, kind: str | None = None):
        self.reason = reason
        self.kind = kind or reason.split(":")[0].split(" (")[0].replace(" ", "_")
        super().__init__(reason)


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of `factor`, pixels within [min, max], aspect ratio kept.

    Same arithmetic as qwen_vl_utils.smart_resize (Python's round, floor for shrinking, ceil for
    growing), so sizes match the reference preprocessing bit for bit.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _on_white(im: Image.Image) -> Image.Image:
    """Composite straight alpha on white (what qwen_vl_utils does) instead of dropping it to black."""
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit by value scaling (PIL's own convert('L') clips at 255)."""
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise ImageDecodeError(f"unsupported mode {im.mode} with shape {arr.shape}", "unsupported")
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        out = np.rint(arr.astype(np.float64) / 257.0)
    else:  # mode "F" or 32-bit ints outside 0..65535: stretch the actual range
        a = arr.astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        out = np.zeros_like(a) if hi <= lo else np.rint((a - lo) * (255.0 / (hi - lo)))
        out = np.nan_to_num(out)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any loaded PIL mode -> RGB: alpha/transparency on white, CMYK, 16-bit and float grayscale."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in im.info and mode in ("P", "L", "RGB", "1")
    ):
        return _on_white(im)
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        return _high_bit_to_l(im).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV"):
        return im.convert("RGB")
    raise ImageDecodeError(f"unsupported mode {mode}", "unsupported")


def _open(data: bytes, max_source_pixels: int) -> Image.Image:
    """Open from the header only and refuse oversized sources before any pixel is decoded."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}", "bomb") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image", "not_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "truncat" in str(e).lower() or isinstance(e, EOFError):
            raise ImageDecodeError("truncated image", "truncated") from None
        raise ImageDecodeError(f"corrupt image: {e}", "corrupt") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"empty image: {w}x{h} px", "empty")
    if w * h > max_source_pixels:
        raise ImageDecodeError(f"decompression bomb: {w}x{h} px > limit {max_source_pixels}", "bomb")
    if max(w, h) / min(w, h) > MAX_RATIO:
        raise ImageDecodeError(
            f"aspect ratio {max(w, h) / min(w, h):.0f} > {MAX_RATIO}: {w}x{h} px", "aspect"
        )
    return im


def decode_image(
    data: bytes,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
) -> np.ndarray:
    """Bytes -> uint8 HxWx3 RGB resized by smart_resize; raises only ImageDecodeError.

    EXIF orientation is not applied and animated images give their first frame, as in the
    reference preprocessing (qwen_vl_utils), so embeddings match it.
    """
    if not data:
        raise ImageDecodeError("empty image data", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(bytes(data), max_source_pixels)
            w, h = im.size
            th, tw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            try:
                im.load()
            except (OSError, SyntaxError, EOFError, ValueError) as e:
                if "truncat" in str(e).lower() or isinstance(e, EOFError):
                    raise ImageDecodeError("truncated image", "truncated") from None
                raise ImageDecodeError(f"corrupt image: {e}", "corrupt") from None
            rgb = to_rgb(im)
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.Resampling.BICUBIC)
            arr = np.array(rgb, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"decompression bomb: {e}", "bomb") from None
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding", "corrupt") from None
    except Exception as e:  # any decoder bug must cost one row, not the worker
        raise ImageDecodeError(f"corrupt image: {type(e).__name__}: {e}", "corrupt") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}", "unsupported")
    return arr


def load_image(
    root: str | Path,
    rel_path: str,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
) -> np.ndarray:
    """Read `root/rel_path` and decode it; a missing or unreadable file is an ImageDecodeError."""
    path = Path(root) / rel_path
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ImageDecodeError(f"missing image: {path}", "missing") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read image: {path}: {e.strerror or e}", "unreadable") from None
    return decode_image(
        data,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        factor=factor,
        max_source_pixels=max_source_pixels,
    )


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW or HxWx{3,4} array -> PNG bytes (toy data, tests, serving payloads)."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected uint8 HxW, HxWx3 or HxWx4, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
