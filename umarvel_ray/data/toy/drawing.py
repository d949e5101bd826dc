"""Drawing a toy scene: an 84x84 RGB image, drawn at 2x and box-reduced, and its PNG bytes.

Deterministic: the only randomness is `jitter_seed` (shapes move by <= 2 px, radii by <= 1 px),
and PIL writes no timestamps, so the same scene and seed give the same bytes on every machine.
"""

from __future__ import annotations

import io
import math
import random
from functools import lru_cache

from PIL import Image, ImageDraw

from umarvel_ray.data.toy.scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SIZES, Scene

_SS = 2  # supersampling factor: drawn at 168 px, box-reduced to 84


def _polygon(cx: float, cy: float, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + x, cy + y) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Fill the shape (radius r, centre cx, cy) with 255 on a mask."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        R = 1.2 * r
        draw.polygon(
            _polygon(cx, cy + 0.2 * r, [(0, -R), (0.866 * R, 0.5 * R), (-0.866 * R, 0.5 * R)]), fill=255
        )
    elif shape == "diamond":
        R = 1.1 * r
        draw.polygon(_polygon(cx, cy, [(0, -R), (0.75 * R, 0), (0, R), (-0.75 * R, 0)]), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = (1.2 if k % 2 == 0 else 0.5) * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
        draw.polygon(_polygon(cx, cy, pts), fill=255)
    elif shape == "cross":
        w = 0.38 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=64)
def _pattern(color: str, texture: str) -> Image.Image:
    """Full-canvas fill for a colour and texture (stripes / dots in a darker shade of the colour)."""
    n = IMAGE_SIZE * _SS
    rgb = COLORS[color]
    img = Image.new("RGB", (n, n), rgb)
    if texture == "solid":
        return img
    dark = tuple(int(v * 0.4) for v in rgb)
    d = ImageDraw.Draw(img)
    if texture == "striped":
        for k in range(-n, n, 10):
            d.line([(k, 0), (k + n, n)], fill=dark, width=4)
    elif texture == "dotted":
        for y in range(2, n, 9):
            for x in range(2 + (y // 9 % 2) * 4, n, 9):
                d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=dark)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return img


def _copy_offsets(position: str, count: int, r: int) -> list[tuple[int, int]]:
    if count == 1:
        return [(0, 0)]
    off = r + 2
    if position in ("left", "right"):
        return [(0, -off), (0, off)]
    return [(-off, 0), (off, 0)]


def render(scene: Scene, jitter_seed: int | str) -> Image.Image:
    """Draw the scene at 84x84; `jitter_seed` moves shapes by <= 2 px and radii by <= 1 px."""
    rng = random.Random(jitter_seed)
    n = IMAGE_SIZE * _SS
    img = Image.new("RGB", (n, n), BACKGROUNDS[scene.background])
    for g in scene.groups:
        r = SIZES[g.size] + rng.choice((-1, 0, 0, 1))
        bx, by = POSITIONS[g.position]
        bx, by = bx + rng.randint(-2, 2), by + rng.randint(-2, 2)
        mask = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(mask)
        for ox, oy in _copy_offsets(g.position, g.count, SIZES[g.size]):
            _draw_shape(draw, g.shape, (bx + ox) * _SS, (by + oy) * _SS, r * _SS)
        img.paste(_pattern(g.color, g.texture), (0, 0), mask)
    return img.reduce(_SS)


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes; PIL writes no timestamps, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
