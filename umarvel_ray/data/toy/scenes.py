"""A tiny scene world for the toy benchmark: attributes, scenes, sampling and one-attribute edits.

A scene is a background colour plus one or two *groups* (one or two identical shapes with a colour,
shape, size, texture, count and position). Everything the benchmark needs is derived from it: an
84x84 image (`drawing`: drawn at 2x and box-reduced, so it is deterministic and a little
anti-aliased), many wordings of the same content (`words`: so text matching needs understanding,
not string equality), and `mutations` that change exactly one attribute (the hard distractors that
leave room for hard negatives and reranking). The flat `attrs` dict is the ground truth the tests'
oracles use.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

IMAGE_SIZE = 84  # pixels; POSITIONS and SIZES are in these coordinates

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
