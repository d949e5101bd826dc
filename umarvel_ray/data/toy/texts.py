"""Texts of the toy's question and composed-retrieval tasks: OVEN and InfoSeek questions, entity
passages and answer statements, CIRR relative captions and FashionIQ relative phrases.

Each names objects with `words.refer` / `words.ref_text`, so a question picks out exactly one
group of its scene, and draws every wording from the caller's `rng`.
"""

from __future__ import annotations

import random

from umarvel_ray.data.toy import words
from umarvel_ray.data.toy.scenes import Group, Mutation, Scene

OBJ_ATTRS = ("color", "shape", "size", "texture", "count")  # what a question may ask about an object


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _be(g: Group) -> str:
    return "are" if g.count == 2 else "is"


def oven_question(scene: Scene, i: int, rng: random.Random) -> str:
    """OVEN-like "what is this object?" question that names the object only by its position."""
    g = scene.groups[i]
    ref, _ = words.refer(scene, i, rng, avoid=OBJ_ATTRS)
    if len(scene.groups) == 1:
        return rng.choice(("What is this?", "What is shown in this image?", f"Name {ref} in the image."))
    pos = words.position_phrase(g.position, rng)
    which = "Which objects are" if g.count == 2 else "Which object is"
    return rng.choice(
        (f"What {_be(g)} {ref}?", f"What is shown {pos}?", f"{which} {pos} in this image?", f"Name {ref}.")
    )


def oven_passage(g: Group, rng: random.Random) -> str:
    gp = words.group_phrase(g, rng)
    form = rng.randrange(3)
    if form == 0:
        return f"{_cap(gp)}. An entity of the {g.shape} family, coloured {g.color}."
    if form == 1:
        return f"Entity page: {gp}."
    return f"{_cap(gp)}: a well-known shape in the toy world."


def oven_name(g: Group, rng: random.Random) -> str:
    return _cap(words.group_phrase(g, rng))


def infoseek_text(
    scene: Scene, i: int, asked: str, ident: dict[str, str], rng: random.Random
) -> tuple[str, str, dict[str, str]]:
    """(question, answer statement, key attrs without the value) about `asked` of group i, named by `ident`."""
    g = scene.groups[i]
    ref = words.ref_text(g, ident, rng)
    key = {"kind": "statement", "asked": asked, **{f"ident.{k}": v for k, v in ident.items()}}
    be = _be(g)
    if asked == "count":
        pos = f" {words.position_phrase(g.position, rng)}" if "position" in ident else ""
        what = f"{ident['color']} " if "color" in ident else ""
        nn = words.plural(ident["shape"]) if "shape" in ident else "shapes"
        q = rng.choice((f"How many {what}{nn} are there{pos}?", f"Count the {what}{nn}{pos}."))
        one = ident.get("shape", "shape")
        ans = f"There are two {what}{nn}{pos}." if g.count == 2 else f"There is one {what}{one}{pos}."
        return q, ans, key
    key["plural"] = "yes" if g.count == 2 else "no"
    R = _cap(ref)
    if asked == "color":
        q = rng.choice(
            (f"What colour {be} {ref}?", f"What color {be} {ref}?", f"Which colour do you see on {ref}?")
        )
        ans = rng.choice((f"{R} {be} {g.color}.", f"{R} {be} coloured {g.color}."))
    elif asked == "shape":
        q = rng.choice((f"What shape {be} {ref}?", f"What kind of shape {be} {ref}?"))
        ans = f"{R} {be} {words.noun(g)}." if g.count == 2 else f"{R} is {words.article(g.shape)} {g.shape}."
    elif asked == "size":
        q = rng.choice((f"How big {be} {ref}?", f"What size {be} {ref}?"))
        ans = f"{R} {be} {rng.choice(words.SIZE_WORDS[g.size])}."
    elif asked == "texture":
        do = "do" if g.count == 2 else "does"
        q = rng.choice((f"What pattern {do} {ref} have?", f"What is the pattern on {ref}?"))
        ans = f"{R} {be} {rng.choice(words.TEXTURE_ADJ[g.texture])}."
    else:
        raise ValueError(f"cannot ask about {asked!r}")
    return q, ans, key


def cirr_text(scene: Scene, m: Mutation, rng: random.Random) -> str:
    """CIRR-like relative caption for one edit of the reference scene."""
    if m.group is None:
        c = rng.choice(words.BG_WORDS[m.new])
        return rng.choice(
            (f"change the background to {c}", f"make the background {c}", f"use a {c} background instead")
        )
    g = scene.groups[m.group]
    ref, _ = words.refer(scene, m.group, rng)
    if m.attr == "color":
        return rng.choice(
            (f"make {ref} {m.new}", f"change the colour of {ref} to {m.new}", f"paint {ref} {m.new}")
        )
    if m.attr == "shape":
        new = words.plural(m.new) if g.count == 2 else f"{words.article(m.new)} {m.new}"
        return rng.choice((f"turn {ref} into {new}", f"change {ref} into {new}", f"make {ref} {new} instead"))
    if m.attr == "size":
        if m.new == "large":
            return rng.choice((f"make {ref} bigger", f"make {ref} larger", f"enlarge {ref}"))
        return rng.choice((f"make {ref} smaller", f"shrink {ref}"))
    if m.attr == "texture":
        return {
            "striped": rng.choice((f"add stripes to {ref}", f"make {ref} striped")),
            "dotted": rng.choice((f"add dots to {ref}", f"make {ref} dotted")),
            "solid": rng.choice((f"make {ref} plain", f"remove the pattern from {ref}")),
        }[m.new]
    if m.attr == "count":
        if m.new == "2":
            return rng.choice((f"duplicate {ref}", f"add a second {g.shape} next to {ref}"))
        return rng.choice((f"remove one of {ref}", f"keep only one of {ref}"))
    if m.attr == "position":
        return rng.choice(
            (f"move {ref} {rng.choice(words.MOVE_WORDS[m.new])}", f"put {ref} {words.POSITION_WORDS[m.new][0]}")
        )
    raise ValueError(f"no caption for {m}")


def fiq_phrase(target: Scene, m: Mutation, rng: random.Random) -> str:
    """FashionIQ-like relative phrase ("is blue", "has stripes") describing the target."""
    if m.group is None:
        c = rng.choice(words.BG_WORDS[m.new])
        return rng.choice((f"has a {c} background", f"is on a {c} backdrop"))
    if m.attr == "color":
        return rng.choice((f"is {m.new}", f"is {m.new} in colour", f"comes in {m.new}"))
    if m.attr == "shape":
        return rng.choice((f"is {m.new}-shaped", f"has a {m.new} shape"))
    if m.attr == "size":
        return (
            rng.choice(("is bigger", "is larger"))
            if m.new == "large"
            else rng.choice(("is smaller", "is tinier"))
        )
    if m.attr == "texture":
        return {
            "striped": rng.choice(("has stripes", "is striped")),
            "dotted": rng.choice(("has dots", "is dotted")),
            "solid": rng.choice(("is plain", "has no pattern")),
        }[m.new]
    if m.attr == "count":
        return (
            rng.choice(("comes as a pair", "is a pair"))
            if m.new == "2"
            else rng.choice(("is a single item", "comes alone"))
        )
    if m.attr == "position":
        return rng.choice(
            (f"is shown {words.position_phrase(m.new, rng)}", f"sits {words.position_phrase(m.new, rng)}")
        )
    raise ValueError(f"no phrase for {m}")
