"""Words for toy scenes: many wordings of one content, from a small vocabulary.

Captions in several dataset styles, partial texts, referring expressions that pick out one group,
and `LEXICON` (surface word -> (attribute, value)), what an "oracle" reader may extract from any
toy text. Every choice of wording is drawn from the caller's `rng`, so a seed gives one text.
"""

from __future__ import annotations

import random

from umarvel_ray.data.toy.scenes import COLORS, SHAPES, Group, Scene

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
