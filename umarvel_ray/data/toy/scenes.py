"""A tiny rendered scene world for the toy benchmark: attributes, one-attribute edits, drawing, words.

A scene is a background colour plus one or two *groups* (one or two identical shapes with a colour,
shape, size, texture, count and position). Everything the benchmark needs is derived from it: an
84x84 image (drawn at 2x and box-reduced, so it is deterministic and a little anti-aliased), many
wordings of the same content (so text matching needs understanding, not string equality), and
`mutations` that change exactly one attribute (the hard distractors that leave room for hard
negatives and reranking). The flat `attrs` dict is the ground truth the tests' oracles use.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, replace
from functools import lru_cache

from PIL import Image, ImageDraw

IMAGE_SIZE = 84
_SS = 2  # supersampling factor: drawn at 168 px, box-reduced to 84

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (46, 160, 67),
    "blue": (38, 89, 214),
    "yellow": (240, 200, 30),
    "purple": (130, 60, 170),
    "orange": (245, 130, 30),
    "pink": (240, 120, 180),
    "cyan": (30, 190, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (120, 120, 120),
    "black": (25, 25, 25),
    "beige": (222, 205, 160),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: dict[str, int] = {"small": 7, "large": 12}  # radius in output pixels
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
COUNTS: tuple[int, ...] = (1, 2)
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (21, 42),
    "right": (63, 42),
    "top": (42, 21),
    "bottom": (42, 63),
    "center": (42, 42),
}
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
GROUP_ATTRS: tuple[str, ...] = ("color", "shape", "size", "texture", "count")
_POS_ORDER = {p: i for i, p in enumerate(POSITIONS)}

WORLDS = ("single", "double", "mixed")


@dataclass(frozen=True)
class Group:
    """One or two identical shapes at one position."""

    color: str
    shape: str
    size: str
    texture: str
    count: int
    position: str

    def attrs(self, with_position: bool = True) -> dict[str, str]:
        """Flat attribute strings (the oracle's view of this group)."""
        d = {a: str(getattr(self, a)) for a in GROUP_ATTRS}
        if with_position:
            d["position"] = self.position
        return d


@dataclass(frozen=True)
class Scene:
    """A background and 1-2 groups, groups ordered by position (left/top first)."""

    background: str
    groups: tuple[Group, ...]

    def attrs(self) -> dict[str, str]:
        """Flat `{"background", "groups", "0.color", ...}`; one mutation changes exactly one value."""
        d = {"background": self.background, "groups": str(len(self.groups))}
        for i, g in enumerate(self.groups):
            d.update({f"{i}.{k}": v for k, v in g.attrs().items()})
        return d

    def key(self) -> str:
        """Canonical string identity (equal scenes, whatever the rendering or wording)."""
        return canonical(self.attrs())

    def to_json(self) -> dict:
        return {"background": self.background, "groups": [g.attrs() for g in self.groups]}


def canonical(attrs: dict[str, str]) -> str:
    """Stable json of a flat attribute dict, used as identity key everywhere."""
    return json.dumps(attrs, sort_keys=True, separators=(",", ":"))


def attr_distance(a: dict[str, str], b: dict[str, str]) -> int:
    """How many attribute values differ (missing keys count as different)."""
    return sum(1 for k in set(a) | set(b) if a.get(k) != b.get(k))


def make_scene(background: str, groups: list[Group]) -> Scene:
    return Scene(background, tuple(sorted(groups, key=lambda g: _POS_ORDER[g.position])))


def sample_group(rng: random.Random, position: str) -> Group:
    return Group(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        texture=rng.choice(TEXTURES),
        count=rng.choice(COUNTS),
        position=position,
    )


def sample_scene(rng: random.Random, world: str) -> Scene:
    """A random scene: "single" one group anywhere, "double" a left/right or top/bottom pair, "mixed" either."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")
    two = world == "double" or (world == "mixed" and rng.random() < 0.6)
    bg = rng.choice(list(BACKGROUNDS))
    if two:
        pair = rng.choice(PAIRS)
        return make_scene(bg, [sample_group(rng, p) for p in pair])
    return make_scene(bg, [sample_group(rng, rng.choice(list(POSITIONS)))])


# ----------------------------------------------------------------------------------------------
# One-attribute edits
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """Change `attr` of group `group` (None: the background) to `new`."""

    group: int | None
    attr: str
    old: str
    new: str


def _values(attr: str) -> list[str]:
    return {
        "color": list(COLORS),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "texture": list(TEXTURES),
        "count": [str(c) for c in COUNTS],
        "position": list(POSITIONS),
        "background": list(BACKGROUNDS),
    }[attr]


def mutations(scene: Scene, attrs: tuple[str, ...] | None = None) -> list[Mutation]:
    """Every single-attribute change (positions move only in one-group scenes, pairs stay put)."""
    out: list[Mutation] = []
    for i, g in enumerate(scene.groups):
        names = GROUP_ATTRS + (("position",) if len(scene.groups) == 1 else ())
        for a in names:
            if attrs is not None and a not in attrs:
                continue
            old = str(getattr(g, a))
            out.extend(Mutation(i, a, old, v) for v in _values(a) if v != old)
    if attrs is None or "background" in attrs:
        out.extend(
            Mutation(None, "background", scene.background, v) for v in BACKGROUNDS if v != scene.background
        )
    return out


def sample_mutations(
    rng: random.Random, scene: Scene, n: int, attrs: tuple[str, ...] | None = None
) -> list[Mutation]:
    """Up to n distinct edits, balanced over (group, attribute) first so colour (7 alternatives)
    does not crowd out size (1 alternative): hard distractors cover every attribute."""
    buckets: dict[tuple[int | None, str], list[Mutation]] = {}
    for m in mutations(scene, attrs):
        buckets.setdefault((m.group, m.attr), []).append(m)
    order = list(buckets)
    rng.shuffle(order)
    for b in order:
        rng.shuffle(buckets[b])
    out: list[Mutation] = []
    depth = 0
    while len(out) < n and any(len(buckets[b]) > depth for b in order):
        out.extend(buckets[b][depth] for b in order if len(buckets[b]) > depth)
        depth += 1
    return out[:n]


def apply_mutation(scene: Scene, m: Mutation) -> Scene:
    if m.group is None:
        return replace(scene, background=m.new)
    groups = list(scene.groups)
    value: str | int = int(m.new) if m.attr == "count" else m.new
    groups[m.group] = replace(groups[m.group], **{m.attr: value})
    return make_scene(scene.background, groups)


def group_scene(g: Group, background: str = "white") -> Scene:
    """The group alone in the centre (entity images of OVEN / InfoSeek candidates)."""
    return make_scene(background, [replace(g, position="center")])


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Words: many wordings of one content, from a small vocabulary
# ----------------------------------------------------------------------------------------------

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
TEXTURE_ADJ: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "polka-dot"),
}
TEXTURE_WITH: dict[str, tuple[str, ...]] = {
    "striped": ("with stripes",),
    "dotted": ("with dots", "with spots"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle"),
}
MOVE_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "to the left side"),
    "right": ("to the right", "to the right side"),
    "top": ("to the top", "up to the top"),
    "bottom": ("to the bottom", "down to the bottom"),
    "center": ("to the center", "to the middle"),
}
BG_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white",),
    "gray": ("gray", "grey"),
    "black": ("black",),
    "beige": ("beige",),
}

# surface word -> (attribute, value): what an "oracle" reader may extract from any toy text.
LEXICON: dict[str, tuple[str, str]] = {}
for _c in COLORS:
    LEXICON[_c] = ("color", _c)
for _s in SHAPES:
    LEXICON[_s] = ("shape", _s)
    LEXICON[_s + ("es" if _s == "cross" else "s")] = ("shape", _s)
for _k, _ws in SIZE_WORDS.items():
    LEXICON.update({w: ("size", _k) for w in _ws})
for _k, _ws in TEXTURE_ADJ.items():
    LEXICON.update({w: ("texture", _k) for w in _ws})
LEXICON.update(
    {"stripes": ("texture", "striped"), "dots": ("texture", "dotted"), "spots": ("texture", "dotted")}
)
for _k, _ws in BG_WORDS.items():
    LEXICON.update({w: ("background", _k) for w in _ws})
LEXICON.update({"two": ("count", "2"), "pair": ("count", "2")})
for _p in ("left", "right", "top", "bottom", "center", "middle", "upper", "lower", "above", "below"):
    LEXICON[_p] = ("position", {"middle": "center", "upper": "top", "lower": "bottom"}.get(_p, _p))


def plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def noun(g: Group) -> str:
    return plural(g.shape) if g.count == 2 else g.shape


def group_phrase(g: Group, rng: random.Random, determiner: bool = True) -> str:
    """ "a big red striped circle", "two tiny green stars with dots", ...: every attribute but position."""
    size = rng.choice(SIZE_WORDS[g.size])
    tex_adj = rng.choice(TEXTURE_ADJ[g.texture])
    form = rng.randrange(4)
    if g.texture == "solid" and rng.random() < 0.6:
        words = [size, g.color] if rng.random() < 0.7 else [g.color, size]
        head = words + [noun(g)]
    elif form == 0:
        head = [size, g.color, tex_adj, noun(g)]
    elif form == 1:
        head = [size, tex_adj, g.color, noun(g)]
    elif form == 2 and g.texture != "solid":
        head = [size, g.color, noun(g), rng.choice(TEXTURE_WITH[g.texture])]
    else:
        head = [tex_adj, size, g.color, noun(g)]
    text = " ".join(head)
    if not determiner:
        return text
    if g.count == 2:
        return ("two " if rng.random() < 0.8 else "a pair of ") + text
    return f"{article(text)} {text}"


def position_phrase(position: str, rng: random.Random) -> str:
    return rng.choice(POSITION_WORDS[position])


def background_phrase(bg: str, rng: random.Random) -> str:
    c = rng.choice(BG_WORDS[bg])
    return rng.choice(
        (
            f"on a {c} background",
            f"against a {c} background",
            f"over a {c} backdrop",
            f"with a {c} background",
        )
    )


def groups_text(scene: Scene, rng: random.Random) -> str:
    """All groups with their positions, in one of several orders or relational forms."""
    parts = [f"{group_phrase(g, rng)} {position_phrase(g.position, rng)}" for g in scene.groups]
    if len(parts) == 1:
        return parts[0]
    a, b = scene.groups
    form = rng.randrange(4)
    if form == 0:
        return f"{parts[0]} and {parts[1]}"
    if form == 1:
        return f"{parts[1]} and {parts[0]}"
    if form == 2:
        return f"{parts[0]}, {parts[1]}"
    if a.position == "left":
        if rng.random() < 0.5:
            return f"{group_phrase(a, rng)} to the left of {group_phrase(b, rng)}"
        return f"{group_phrase(b, rng)} to the right of {group_phrase(a, rng)}"
    if rng.random() < 0.5:
        return f"{group_phrase(a, rng)} above {group_phrase(b, rng)}"
    return f"{group_phrase(b, rng)} below {group_phrase(a, rng)}"


def caption(scene: Scene, rng: random.Random, style: str = "plain") -> str:
    """A full description of the scene (every attribute of every group and the background).

    Styles: "plain" (MSCOCO-like), "news" (VisualNews / EDIS), "product" (Fashion200K),
    "question" (WebQA queries), "passage" (WebQA text candidates).
    """
    if style == "product":
        return product_phrase(scene, rng)
    body = groups_text(scene, rng)
    bg = background_phrase(scene.background, rng)
    bgc = rng.choice(BG_WORDS[scene.background])
    if style == "plain":
        prefix = rng.choice(("", "", "a picture of ", "an image of ", "a drawing of ", "a photo showing "))
        form = rng.randrange(3)
        if form == 0:
            return f"{prefix}{body} {bg}"
        if form == 1:
            return f"{bg[0].upper()}{bg[1:]}, {prefix}{body}"
        return f"{prefix}{body}. The background is {bgc}"
    if style == "news":
        prefix = rng.choice(("Photo: ", "Pictured: ", "File photo: ", "In this photo, ", "Seen here: "))
        return f"{prefix}{body} {bg}" if rng.random() < 0.6 else f"{prefix}{body}. Background: {bgc}"
    if style == "question":
        lead = rng.choice(
            (
                "Which picture shows {}?",
                "What image has {}?",
                "Where can I find a picture of {}?",
                "Is there an image with {}?",
            )
        )
        return lead.format(f"{body} {bg}")
    if style == "passage":
        lead = rng.choice(("This picture shows {}.", "The image contains {}.", "In this image there is {}."))
        tail = rng.choice(("The background is {}.", "Its backdrop is {}.", "It has a {} background."))
        return f"{lead.format(body)} {tail.format(bgc)}"
    raise ValueError(f"unknown caption style {style!r}")


def product_phrase(scene: Scene, rng: random.Random) -> str:
    """Fashion200K-like short product text for a one-group scene (all attributes, no article)."""
    (g,) = scene.groups
    size = rng.choice(SIZE_WORDS[g.size])
    tex = rng.choice(TEXTURE_ADJ[g.texture])
    bgc = rng.choice(BG_WORDS[scene.background])
    pos = position_phrase(g.position, rng)
    lead = "pair of " if g.count == 2 else ""
    form = rng.randrange(3)
    if form == 0:
        return f"{lead}{size} {g.color} {tex} {noun(g)} {pos}, {bgc} background"
    if form == 1:
        return f"{lead}{tex} {noun(g)} in {g.color}, {size} size, {pos} on {bgc}"
    return f"{g.color} {lead}{noun(g)}, {tex}, {size}, {bgc} backdrop, {pos}"


def partial_text(scene: Scene, index: int, rng: random.Random, style: str) -> str:
    """Text naming one group only ("headline" for EDIS, "caption" for WebQA): the image carries the rest."""
    g = scene.groups[index]
    gp, pp = group_phrase(g, rng), position_phrase(g.position, rng)
    if style == "headline":
        t = rng.choice(("{g} seen {p}", "Report: {g} {p}", "{g} appears {p}", "Breaking: {g} {p}"))
    else:
        t = rng.choice(("{g} {p}", "Picture with {g} {p}", "{g} shown {p}"))
    s = t.format(g=gp, p=pp)
    return s[0].upper() + s[1:]


def refer_options(scene: Scene, index: int, avoid: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Attribute sets that pick out group `index` alone ({} = "the object" of a one-group scene)."""
    g = scene.groups[index]
    out: list[dict[str, str]] = []
    if len(scene.groups) == 1 and "position" not in avoid:
        out.append({})
    for names in (("shape",), ("color", "shape"), ("color",), ("position",), ("shape", "position")):
        if any(a in avoid for a in names):
            continue
        ident = {a: str(getattr(g, a)) for a in names}
        hits = [h for h in scene.groups if all(str(getattr(h, a)) == v for a, v in ident.items())]
        if len(hits) == 1:
            out.append(ident)
    return out


def ref_text(g: Group, ident: dict[str, str], rng: random.Random) -> str:
    """Words for a referring expression: {"color": "red", "shape": "circle"} -> "the red circle(s)"."""
    many = g.count == 2
    head = (plural(ident["shape"]) if many else ident["shape"]) if "shape" in ident else None
    if head is None:
        head = "objects" if many else rng.choice(("object", "shape"))
    words = ["the"] + ([ident["color"]] if "color" in ident else []) + [head]
    if "position" in ident:
        words.append(position_phrase(ident["position"], rng))
    return " ".join(words)


def refer(
    scene: Scene, index: int, rng: random.Random, avoid: tuple[str, ...] = ()
) -> tuple[str, dict[str, str]]:
    """A referring expression that picks out exactly one group, not using the attributes in `avoid`.

    Returns ("the red circles", {"color": "red", "shape": "circle"}); raises ValueError when no
    unique expression exists.
    """
    options = refer_options(scene, index, avoid)
    if not options:
        raise ValueError("no unique referring expression")
    ident = rng.choice(options)
    return ref_text(scene.groups[index], ident, rng), ident
