"""Client images and texts -> model items, checked in the ingress before anything is batched.

A batch fails as a whole when one of its items raises, so every item is validated and decoded
here, one request at a time: a bad image costs its own request a 400/413, never its batch-mates.
Only bytes in the request are read: URLs and paths are refused, never fetched or opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from umarvel_ray.data.images import ImageDecodeError, decode_image
from umarvel_ray.serve.config import Limits
from umarvel_ray.serve.errors import ApiError

FORMATS = ("JPEG", "PNG", "WEBP")
_DATA_URI = re.compile(r"^data:([^;,]*)(;base64)?,", re.IGNORECASE)
_MIMES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


def image_bytes(value: str, limits: Limits, param: str) -> bytes:
    """base64 or `data:image/(jpeg|png|webp);base64,` -> raw bytes; 400/413 naming `param`."""
    s = value.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://", "file:", "ftp://", "s3://", "gs://")):
        raise ApiError(400, f"{param}: URLs and paths are not accepted; send the image bytes as base64", param)
    m = _DATA_URI.match(s)
    if m:
        mime = m.group(1).lower()
        if mime not in _MIMES:
            raise ApiError(400, f"{param}: data URI type {mime or '(none)'!r} is not image/jpeg|png|webp", param)
        if not m.group(2):
            raise ApiError(400, f"{param}: data URI must be base64-encoded", param)
        s = s[m.end() :]
    if len(s) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, f"{param}: image over {limits.max_image_bytes} bytes", param, "image_too_large")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{param}: invalid base64 (send the image bytes; paths and URLs are never read)", param, "invalid_base64"
        ) from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{param}: image over {limits.max_image_bytes} bytes", param, "image_too_large")
    if not data:
        raise ApiError(400, f"{param}: empty image", param, "invalid_image")
    return data


def check_header(data: bytes, limits: Limits, param: str) -> None:
    """Format and size from the header alone, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        try:
            with Image.open(io.BytesIO(data)) as other:
                fmt = other.format
        except Exception:
            fmt = None
        if fmt:
            raise ApiError(400, f"{param}: format {fmt} is not accepted (JPEG, PNG, WEBP)", param, "unsupported_format") from None
        raise ApiError(400, f"{param}: bytes are not an image", param, "invalid_image") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"{param}: image over the pixel cap", param, "image_too_large") from None
    except Exception as e:
        raise ApiError(400, f"{param}: unreadable image ({type(e).__name__})", param, "invalid_image") from None
    if w * h > limits.max_image_pixels:
        raise ApiError(
            413, f"{param}: {w}x{h} px is over the {limits.max_image_pixels} pixel cap", param, "image_too_large"
        )
    if min(w, h) < limits.min_image_side:
        raise ApiError(
            400, f"{param}: {w}x{h} px is below the minimum side {limits.min_image_side}", param, "image_too_small"
        )


def decode_client_image(value: str, limits: Limits, pixels: tuple[int, int], param: str) -> np.ndarray:
    """A client image string -> uint8 HxWx3 at the model's resolution (same path as the batch jobs)."""
    data = image_bytes(value, limits, param)
    check_header(data, limits, param)
    try:
        return decode_image(data, min_pixels=pixels[0], max_pixels=pixels[1], max_source_pixels=limits.max_image_pixels)
    except ImageDecodeError as e:
        status = 413 if e.kind == "bomb" else 400
        raise ApiError(status, f"{param}: {e.reason}", param, "invalid_image") from None


def check_text(value: str | None, limits: Limits, param: str) -> str | None:
    if value is not None and len(value) > limits.max_text_chars:
        raise ApiError(422, f"{param}: {len(value)} characters, over the {limits.max_text_chars} limit", param)
    return value


def model_item(item: Any, limits: Limits, pixels: tuple[int, int], param: str) -> dict[str, Any]:
    """A validated `schemas.Item` -> the model's item dict (image decoded)."""
    image = decode_client_image(item.image, limits, pixels, f"{param}.image") if item.image else None
    return {
        "text": check_text(item.text, limits, f"{param}.text"),
        "image": image,
        "instruction": check_text(item.instruction, limits, f"{param}.instruction"),
    }
