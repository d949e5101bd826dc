"""A deterministic toy M-BEIR: the real directory layout and 16 task files, content from `scenes`.

Why: every stage of the recipe (progressive transition, instruction tuning, hard-negative mining,
reranking, local and global evaluation) must run end to end on 2 CPU cores in minutes and show
real effects. So the toy keeps M-BEIR's file formats, dataset ids, task ids and modalities but
swaps the content for rendered 84x84 scenes of one or two coloured shapes that a tiny Qwen2-VL
learns in minutes, with one-attribute hard distractors in every pool (so hard negatives and
reranking have something to fix) and several wordings per content (so matching needs
understanding, not string equality).

Guarantees (tested in tests/test_toy.py):
- every positive is in its local pool and in the union pool; positives are *complete*: within a
  split no other candidate of the same modality anywhere has the same content (a per-split
  registry owns each (modality, content) key), so local and global labels are both exact;
- train and test queries share no scene (query or target) and no image file; train pools hold no
  test scene at all; pretraining pairs avoid test scenes too;
- the same seed gives byte-identical files (stable order, no timestamps, PNG from PIL).
Every record's `src_content` carries the ground truth (`{"toy": {"attrs": ..., "scene": ...}}`)
for oracles and debugging; models never see it.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.data import catalogue, instructions, mbeir, writers
from umarvel_ray.data.toy import scenes as sc
from umarvel_ray.data.toy.scenes import Group, Mutation, Scene

GENERATOR_VERSION = 1
INFO_FILE = "toy_info.json"
NLI_FILE = "pretrain/nli_pairs.jsonl"
CAPTION_FILE = "pretrain/caption_pairs.jsonl"
TRAIN_QRELS_FILE = "qrels/train/mbeir_union_up_train_qrels.txt"
_OWNED = ("query", "cand_pool", "qrels", "instructions", "mbeir_images", "pretrain", INFO_FILE)


@dataclass(frozen=True)
class Preset:
    """How big one build is; `small` is the CI fixture, `medium` the demo and benchmarks."""

    test_queries: int
    test_pool: int
    test_distractors: int
    train_queries: int
    train_distractors: int
    nli_pairs: int
    caption_pairs: int


PRESETS: dict[str, Preset] = {
    "small": Preset(40, 200, 4, 200, 1, 1500, 1500),
    "medium": Preset(250, 1200, 4, 1200, 1, 10000, 8000),
}

# Realistic M-BEIR-like wording, 4 prompts per (dataset, query modality, candidate modality).
INSTRUCTIONS: dict[str, tuple[str, str, str, str]] = {
    "visualnews_task0": (
        "Identify the news-related image in line with the described event.",
        "Display an image that best captures the following caption from a news post.",
        "Retrieve an image that matches the given news caption.",
        "Find the news photo that goes with this caption.",
    ),
    "mscoco_task0": (
        "Identify the image which is described by the given caption.",
        "Retrieve an everyday image that matches the caption.",
        "Find the picture that the following description refers to.",
        "Show me an image that fits this caption.",
    ),
    "fashion200k_task0": (
        "Based on the following fashion description, retrieve the best matching image.",
        "Find the product image that matches this description.",
        "Match the provided description to the correct fashion item photo.",
        "Retrieve an image of the item described below.",
    ),
    "webqa_task1": (
        "Retrieve passages from Wikipedia that provide answers to the following question.",
        "Find a Wikipedia paragraph that answers the question.",
        "Identify the text snippet that best answers this question.",
        "Provide the passage that contains the answer to the query.",
    ),
    "edis_task2": (
        "Find a news image that matches the provided caption and its corresponding headline.",
        "Retrieve a news photo and headline pair that fits the caption.",
        "Identify the news image with a headline that corresponds to this text.",
        "Find the image and headline of the news story described.",
    ),
    "webqa_task2": (
        "Find a Wikipedia image that answers this question.",
        "Retrieve an image with its caption that answers the question.",
        "Provide an image and description from Wikipedia that answer the query.",
        "Identify the captioned image that responds to this question.",
    ),
    "visualnews_task3": (
        "Find a caption for the news in the given photo.",
        "Retrieve the news caption that describes this image.",
        "Identify the caption written for this news photo.",
        "Produce the matching news caption for the image.",
    ),
    "mscoco_task3": (
        "Find an image caption describing the following everyday image.",
        "Retrieve a caption that describes the given picture.",
        "Identify the description that matches this image.",
        "Match the image to its caption.",
    ),
    "fashion200k_task3": (
        "Find a product description for the fashion item in the image.",
        "Retrieve the description of the item shown.",
        "Identify the text that describes this product photo.",
        "Match this fashion image with its product description.",
    ),
    "nights_task4": (
        "Find a day-to-day image that looks similar to the provided image.",
        "Retrieve an image that is visually alike to the given one.",
        "Identify the picture that best resembles this image.",
        "Find another photo of the scene shown in this image.",
    ),
    "oven_task6": (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Find the encyclopedia entry about the object the question asks about in the image.",
        "Determine the entity in the image the question refers to and retrieve its description.",
        "Using the image and question, find the passage that names the entity.",
    ),
    "infoseek_task6": (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Find the passage that answers the question about this image.",
        "Using the image, retrieve the text that answers the question.",
        "Identify the statement that answers this question about the picture.",
    ),
    "fashioniq_task7": (
        "Find a fashion image that aligns with the reference image and style note.",
        "Retrieve the product photo that looks like the reference but with the described changes.",
        "Given the item and the requested changes, find the matching fashion image.",
        "Identify the fashion item image that fits the reference after applying the note.",
    ),
    "cirr_task7": (
        "Retrieve a day-to-day image that aligns with the modification instructions of the provided image.",
        "Find the image that results from applying the described change to this picture.",
        "Modify the reference image as instructed and retrieve the matching picture.",
        "Identify the picture that shows the reference scene after the edit.",
    ),
    "oven_task8": (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Find the entity image and name that answer the question about this picture.",
        "Identify the reference image with its description that matches the queried object.",
        "Using the image and question, retrieve the matching entity image and text.",
    ),
    "infoseek_task8": (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Find an image with a passage that answers the question about the picture.",
        "Identify the image and statement that answer this question.",
        "Using the picture, retrieve the illustrated passage that answers the query.",
    ),
}

# Which scenes each dataset draws ("single": one group, "double": a pair, "mixed": either).
WORLD: dict[str, str] = {
    "VisualNews": "double",
    "MSCOCO": "mixed",
    "Fashion200K": "single",
    "WebQA": "double",
    "EDIS": "double",
    "NIGHTS": "mixed",
    "OVEN": "double",
    "InfoSeek": "double",
    "FashionIQ": "single",
    "CIRR": "mixed",
}
CAPTION_STYLE = {"VisualNews": "news", "MSCOCO": "plain", "Fashion200K": "product"}
_OBJ_ATTRS = ("color", "shape", "size", "texture", "count")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


@dataclass
class _Cand:
    """A candidate before it gets an id: content, identity key and the scene to draw (if any)."""

    attrs: dict[str, str]
    txt: str | None = None
    scene: Scene | None = None  # drawn into the candidate's image
    about: Scene | None = None  # the whole scene this content describes (test/train separation)
    did: str = ""
    img_path: str | None = None

    @property
    def key(self) -> str:
        return sc.canonical(self.attrs)


@dataclass
class _Query:
    txt: str | None
    scene: Scene | None  # drawn into the query image
    info: dict[str, Any]


@dataclass
class _Proposal:
    """One query with its positives and hard distractors, accepted or rejected as a whole."""

    query: _Query
    uses: list[Scene]  # scenes this query is about (claimed by test, forbidden for train)
    positives: list[_Cand]
    distractors: list[_Cand]


@dataclass
class _ImageJob:
    path: str
    scene: Scene


@dataclass
class _Ctx:
    """Per-build state: id counters, the image queue, test claims and the per-split registry."""

    seed: int
    images: list[_ImageJob] = field(default_factory=list)
    qn: dict[int, int] = field(default_factory=dict)
    dn: dict[int, int] = field(default_factory=dict)
    imn: dict[tuple[str, str], int] = field(default_factory=dict)
    test_scenes: set[str] = field(default_factory=set)
    registry: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)

    def next_qid(self, ds: int) -> str:
        self.qn[ds] = self.qn.get(ds, 0) + 1
        return f"{ds}:{self.qn[ds]}"

    def next_did(self, ds: int) -> str:
        self.dn[ds] = self.dn.get(ds, 0) + 1
        return f"{ds}:{self.dn[ds]}"

    def image(self, dataset: str, split: str, scene: Scene) -> str:
        k = (dataset, split)
        self.imn[k] = self.imn.get(k, 0) + 1
        path = f"mbeir_images/{dataset.lower()}_images/{split}/{self.imn[k]:06d}.png"
        self.images.append(_ImageJob(path, scene))
        return path


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _scene_cand(scene: Scene, txt: str | None = None, draw: bool = True) -> _Cand:
    return _Cand(attrs=scene.attrs(), txt=txt, scene=scene if draw else None, about=scene)


def _pick_mutations(
    rng: random.Random, scene: Scene, n: int, attrs: tuple[str, ...] | None = None
) -> list[Mutation]:
    return sc.sample_mutations(rng, scene, n, attrs)


def _rng_keep(rng: random.Random, k: int, items: list[Any]) -> list[Any]:
    return rng.sample(items, min(k, len(items)))


# ----------------------------------------------------------------------------------------------
# Texts for OVEN / InfoSeek / composed retrieval
# ----------------------------------------------------------------------------------------------


def _be(g: Group) -> str:
    return "are" if g.count == 2 else "is"


def _oven_question(scene: Scene, i: int, rng: random.Random) -> str:
    """OVEN-like "what is this object?" question that names the object only by its position."""
    g = scene.groups[i]
    ref, _ = sc.refer(scene, i, rng, avoid=_OBJ_ATTRS)
    if len(scene.groups) == 1:
        return rng.choice(("What is this?", "What is shown in this image?", f"Name {ref} in the image."))
    pos = sc.position_phrase(g.position, rng)
    which = "Which objects are" if g.count == 2 else "Which object is"
    return rng.choice(
        (f"What {_be(g)} {ref}?", f"What is shown {pos}?", f"{which} {pos} in this image?", f"Name {ref}.")
    )


def _oven_passage(g: Group, rng: random.Random) -> str:
    gp = sc.group_phrase(g, rng)
    form = rng.randrange(3)
    if form == 0:
        return f"{_cap(gp)}. An entity of the {g.shape} family, coloured {g.color}."
    if form == 1:
        return f"Entity page: {gp}."
    return f"{_cap(gp)}: a well-known shape in the toy world."


def _oven_name(g: Group, rng: random.Random) -> str:
    return _cap(sc.group_phrase(g, rng))


def _group_attrs(g: Group, prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{k}": v for k, v in g.attrs(with_position=False).items()}


def _infoseek(
    scene: Scene, i: int, asked: str, ident: dict[str, str], rng: random.Random
) -> tuple[str, str, dict[str, str]]:
    """(question, answer statement, key attrs without the value) about `asked` of group i, named by `ident`."""
    g = scene.groups[i]
    ref = sc.ref_text(g, ident, rng)
    key = {"kind": "statement", "asked": asked, **{f"ident.{k}": v for k, v in ident.items()}}
    be = _be(g)
    if asked == "count":
        pos = f" {sc.position_phrase(g.position, rng)}" if "position" in ident else ""
        what = f"{ident['color']} " if "color" in ident else ""
        nn = sc.plural(ident["shape"]) if "shape" in ident else "shapes"
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
        ans = f"{R} {be} {sc.noun(g)}." if g.count == 2 else f"{R} is {sc.article(g.shape)} {g.shape}."
    elif asked == "size":
        q = rng.choice((f"How big {be} {ref}?", f"What size {be} {ref}?"))
        ans = f"{R} {be} {rng.choice(sc.SIZE_WORDS[g.size])}."
    elif asked == "texture":
        do = "do" if g.count == 2 else "does"
        q = rng.choice((f"What pattern {do} {ref} have?", f"What is the pattern on {ref}?"))
        ans = f"{R} {be} {rng.choice(sc.TEXTURE_ADJ[g.texture])}."
    else:
        raise ValueError(f"cannot ask about {asked!r}")
    return q, ans, key


def _cirr_text(scene: Scene, m: Mutation, rng: random.Random) -> str:
    """CIRR-like relative caption for one edit of the reference scene."""
    if m.group is None:
        c = rng.choice(sc.BG_WORDS[m.new])
        return rng.choice(
            (f"change the background to {c}", f"make the background {c}", f"use a {c} background instead")
        )
    g = scene.groups[m.group]
    ref, _ = sc.refer(scene, m.group, rng)
    if m.attr == "color":
        return rng.choice(
            (f"make {ref} {m.new}", f"change the colour of {ref} to {m.new}", f"paint {ref} {m.new}")
        )
    if m.attr == "shape":
        new = sc.plural(m.new) if g.count == 2 else f"{sc.article(m.new)} {m.new}"
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
            (f"move {ref} {rng.choice(sc.MOVE_WORDS[m.new])}", f"put {ref} {sc.POSITION_WORDS[m.new][0]}")
        )
    raise ValueError(f"no caption for {m}")


def _fiq_phrase(target: Scene, m: Mutation, rng: random.Random) -> str:
    """FashionIQ-like relative phrase ("is blue", "has stripes") describing the target."""
    if m.group is None:
        c = rng.choice(sc.BG_WORDS[m.new])
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
            (f"is shown {sc.position_phrase(m.new, rng)}", f"sits {sc.position_phrase(m.new, rng)}")
        )
    raise ValueError(f"no phrase for {m}")


# ----------------------------------------------------------------------------------------------
# One proposer per task family: (rng, dataset) -> _Proposal, and a filler candidate maker
# ----------------------------------------------------------------------------------------------


def _several(rng: random.Random, p: float = 0.25) -> int:
    return 2 if rng.random() < p else 1


def _prop_t2i(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = _Query(sc.caption(s, rng, CAPTION_STYLE[ds]), None, {"scene": s.to_json()})
    pos = [_scene_cand(s) for _ in range(_several(rng))]
    dis = [_scene_cand(sc.apply_mutation(s, m)) for m in _pick_mutations(rng, s, n_dis)]
    return _Proposal(q, [s], pos, dis)


def _distinct_captions(scene: Scene, rng: random.Random, style: str, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(20 * n):
        t = sc.caption(scene, rng, style)
        if t not in out:
            out.append(t)
        if len(out) == n:
            break
    return out


def _prop_i2t(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    style = CAPTION_STYLE[ds]
    n_pos = rng.choice((1, 2, 2, 3)) if ds == "MSCOCO" else 1
    pos = [_scene_cand(s, t, draw=False) for t in _distinct_captions(s, rng, style, n_pos)]
    dis = [
        _scene_cand(d, sc.caption(d, rng, style), draw=False)
        for d in (sc.apply_mutation(s, m) for m in _pick_mutations(rng, s, n_dis))
    ]
    return _Proposal(_Query(None, s, {"scene": s.to_json()}), [s], pos, dis)


def _prop_t2t(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = _Query(sc.caption(s, rng, "question"), None, {"scene": s.to_json()})
    pos = [_scene_cand(s, sc.caption(s, rng, "passage"), draw=False)]
    dis = [
        _scene_cand(d, sc.caption(d, rng, "passage"), draw=False)
        for d in (sc.apply_mutation(s, m) for m in _pick_mutations(rng, s, n_dis))
    ]
    return _Proposal(q, [s], pos, dis)


def _t2it_cand(s: Scene, rng: random.Random, ds: str, index: int | None = None) -> _Cand:
    i = rng.randrange(len(s.groups)) if index is None else index
    style = "headline" if ds == "EDIS" else "caption"
    return _scene_cand(s, sc.partial_text(s, i, rng, style))


def _prop_t2it(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = _Query(sc.caption(s, rng, "news" if ds == "EDIS" else "question"), None, {"scene": s.to_json()})
    n_pos = _several(rng)
    pos = [_t2it_cand(s, rng, ds, (k if n_pos == 2 else None)) for k in range(n_pos)]
    dis = [_t2it_cand(sc.apply_mutation(s, m), rng, ds) for m in _pick_mutations(rng, s, n_dis)]
    return _Proposal(q, [s], pos, dis)


def _prop_i2i(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    pos = [_scene_cand(s) for _ in range(_several(rng, 0.3))]
    dis = [_scene_cand(sc.apply_mutation(s, m)) for m in _pick_mutations(rng, s, n_dis)]
    return _Proposal(_Query(None, s, {"scene": s.to_json()}), [s], pos, dis)


def _oven_cand(g: Group, rng: random.Random, with_image: bool) -> _Cand:
    if with_image:
        return _Cand(
            attrs={"kind": "group", **_group_attrs(g)}, txt=_oven_name(g, rng), scene=sc.group_scene(g)
        )
    return _Cand(attrs={"kind": "group", **_group_attrs(g)}, txt=_oven_passage(g, rng))


def _prop_oven(rng: random.Random, ds: str, n_dis: int, with_image: bool) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    i = rng.randrange(len(s.groups))
    g = s.groups[i]
    q = _Query(_oven_question(s, i, rng), s, {"scene": s.to_json(), "group": i})
    pos = [_oven_cand(g, rng, with_image)]
    single = sc.make_scene("white", [g])
    dis = [
        _oven_cand(sc.apply_mutation(single, m).groups[0], rng, with_image)
        for m in _pick_mutations(rng, single, n_dis, _OBJ_ATTRS)
    ]
    dis += [_oven_cand(h, rng, with_image) for j, h in enumerate(s.groups) if j != i]
    return _Proposal(q, [s], pos, dis)


def _infoseek_cand(
    s: Scene, i: int, asked: str, ident: dict[str, str], rng: random.Random, with_image: bool
) -> tuple[str, _Cand]:
    q, ans, key = _infoseek(s, i, asked, ident, rng)
    g = s.groups[i]
    if with_image:
        key.pop("plural", None)  # implied by the drawn count
        return q, _Cand(attrs={**key, **_group_attrs(g, "g.")}, txt=ans, scene=sc.group_scene(g))
    return q, _Cand(attrs={**key, "value": str(getattr(g, asked))}, txt=ans)


def _prop_infoseek(rng: random.Random, ds: str, n_dis: int, with_image: bool) -> _Proposal:
    """Question about one attribute of one group; distractors keep the reference and change the answer
    (and, with images, also keep the answer but change another attribute of the drawn object)."""
    s = sc.sample_scene(rng, WORLD[ds])
    i = rng.randrange(len(s.groups))
    asked = rng.choice(_OBJ_ATTRS)
    ident = rng.choice(sc.refer_options(s, i, avoid=(asked,)))
    q, pos = _infoseek_cand(s, i, asked, ident, rng, with_image)
    query = _Query(q, s, {"scene": s.to_json(), "group": i, "asked": asked, "ident": ident})
    edits = [m for m in sc.mutations(s, (asked,)) if m.group == i]
    picks = _rng_keep(rng, max(1, n_dis - 1) if with_image else n_dis, edits)
    if with_image:
        keep = tuple(a for a in _OBJ_ATTRS if a != asked and a not in ident)
        picks += _rng_keep(rng, 1, [m for m in sc.mutations(s, keep) if m.group == i])
    dis = [_infoseek_cand(sc.apply_mutation(s, m), i, asked, ident, rng, with_image)[1] for m in picks]
    return _Proposal(query, [s], [pos], dis)


def _cirr_cands(scenes: list[Scene]) -> list[_Cand]:
    return [_scene_cand(x) for x in scenes]


def _prop_cirr(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    (m,) = sc.sample_mutations(rng, s, 1)
    t = sc.apply_mutation(s, m)
    q = _Query(_cirr_text(s, m, rng), s, {"scene": s.to_json(), "target_scene": t.to_json()})
    pos = _cirr_cands([t] * _several(rng))
    same_attr = [x for x in sc.mutations(s, (m.attr,)) if x.group == m.group and x.new != m.new]
    dis_scenes = [s] + [sc.apply_mutation(s, x) for x in _rng_keep(rng, 1, same_attr)]
    more = max(0, n_dis - len(dis_scenes))
    t_edits = [x for x in sc.sample_mutations(rng, t, more + 1) if sc.apply_mutation(t, x) != s]
    dis_scenes += [sc.apply_mutation(t, x) for x in t_edits[:more]]
    return _Proposal(q, [s, t], pos, _cirr_cands(dis_scenes))


def _prop_fashioniq(rng: random.Random, ds: str, n_dis: int) -> _Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    (m1,) = sc.sample_mutations(rng, s, 1)
    mid = sc.apply_mutation(s, m1)
    others = tuple(a for a in (*sc.GROUP_ATTRS, "position", "background") if a != m1.attr)
    (m2,) = sc.sample_mutations(rng, mid, 1, others)
    t = sc.apply_mutation(mid, m2)
    text = f"{_fiq_phrase(t, m1, rng)} and {_fiq_phrase(t, m2, rng)}"
    q = _Query(text, s, {"scene": s.to_json(), "target_scene": t.to_json()})
    # each edit alone and the reference itself, then other one-attribute edits of the target
    dis_scenes = [mid, sc.apply_mutation(s, m2), s]
    rest = tuple(a for a in others if a != m2.attr)
    dis_scenes += [sc.apply_mutation(t, x) for x in sc.sample_mutations(rng, t, max(0, n_dis - 2), rest)]
    return _Proposal(q, [s, t], _cirr_cands([t] * _several(rng)), _cirr_cands(dis_scenes))


@dataclass(frozen=True)
class _Family:
    propose: Callable[[random.Random, str, int], _Proposal]
    filler: Callable[[random.Random, str], _Cand]


def _fill_scene_image(rng: random.Random, ds: str) -> _Cand:
    return _scene_cand(sc.sample_scene(rng, WORLD[ds]))


def _fill_caption(rng: random.Random, ds: str) -> _Cand:
    s = sc.sample_scene(rng, WORLD[ds])
    return _scene_cand(s, sc.caption(s, rng, CAPTION_STYLE[ds]), draw=False)


def _fill_passage(rng: random.Random, ds: str) -> _Cand:
    s = sc.sample_scene(rng, WORLD[ds])
    return _scene_cand(s, sc.caption(s, rng, "passage"), draw=False)


def _fill_t2it(rng: random.Random, ds: str) -> _Cand:
    return _t2it_cand(sc.sample_scene(rng, WORLD[ds]), rng, ds)


def _fill_oven(with_image: bool) -> Callable[[random.Random, str], _Cand]:
    def fill(rng: random.Random, ds: str) -> _Cand:
        return _oven_cand(sc.sample_group(rng, "center"), rng, with_image)

    return fill


def _fill_infoseek(with_image: bool) -> Callable[[random.Random, str], _Cand]:
    def fill(rng: random.Random, ds: str) -> _Cand:
        s = sc.sample_scene(rng, WORLD[ds])
        i = rng.randrange(len(s.groups))
        asked = rng.choice(_OBJ_ATTRS)
        ident = rng.choice(sc.refer_options(s, i, avoid=(asked,)))
        return _infoseek_cand(s, i, asked, ident, rng, with_image)[1]

    return fill


FAMILIES: dict[int, dict[str, _Family]] = {
    0: {d: _Family(_prop_t2i, _fill_scene_image) for d in ("VisualNews", "MSCOCO", "Fashion200K")},
    1: {"WebQA": _Family(_prop_t2t, _fill_passage)},
    2: {d: _Family(_prop_t2it, _fill_t2it) for d in ("EDIS", "WebQA")},
    3: {d: _Family(_prop_i2t, _fill_caption) for d in ("VisualNews", "MSCOCO", "Fashion200K")},
    4: {"NIGHTS": _Family(_prop_i2i, _fill_scene_image)},
    6: {
        "OVEN": _Family(lambda r, d, n: _prop_oven(r, d, n, False), _fill_oven(False)),
        "InfoSeek": _Family(lambda r, d, n: _prop_infoseek(r, d, n, False), _fill_infoseek(False)),
    },
    7: {
        "FashionIQ": _Family(_prop_fashioniq, _fill_scene_image),
        "CIRR": _Family(_prop_cirr, _fill_scene_image),
    },
    8: {
        "OVEN": _Family(lambda r, d, n: _prop_oven(r, d, n, True), _fill_oven(True)),
        "InfoSeek": _Family(lambda r, d, n: _prop_infoseek(r, d, n, True), _fill_infoseek(True)),
    },
}


# ----------------------------------------------------------------------------------------------
# Assembling one task of one split
# ----------------------------------------------------------------------------------------------


@dataclass
class _TaskData:
    spec: catalogue.TaskSpec
    queries: list[dict[str, Any]]
    pool: list[dict[str, Any]]


class _TaskBuilder:
    """Accepts proposals under the split's rules, then fills, shuffles and numbers the pool."""

    def __init__(self, ctx: _Ctx, spec: catalogue.TaskSpec, split: str):
        self.ctx, self.spec, self.split = ctx, spec, split
        self.rng = random.Random(f"{ctx.seed}:{split}:{spec.name}")
        self.family = FAMILIES[spec.task_id][spec.dataset]
        self.registry = ctx.registry.setdefault(split, {})
        self.pool: dict[str, list[_Cand]] = {}
        self.queries: list[tuple[_Query, str]] = []
        self.query_scenes: set[str] = set()

    def _forbidden(self, scene: Scene | None) -> bool:
        return self.split != "test" and scene is not None and scene.key() in self.ctx.test_scenes

    def _free(self, c: _Cand) -> bool:
        """The content is not owned by another task's pool of this split and not a test scene here."""
        owner = self.registry.get((self.spec.cand_modality, c.key))
        return (owner is None or owner == self.spec.name) and not self._forbidden(c.about)

    def _add(self, c: _Cand) -> None:
        self.registry[(self.spec.cand_modality, c.key)] = self.spec.name
        self.pool.setdefault(c.key, []).append(c)

    def offer(self, p: _Proposal) -> bool:
        skey = p.uses[0].key()
        if skey in self.query_scenes or any(self._forbidden(s) for s in p.uses):
            return False
        key = p.positives[0].key
        if not self._free(p.positives[0]):
            return False
        if key not in self.pool:
            for c in p.positives:
                self._add(c)
        for d in p.distractors:
            if d.key != key and d.key not in self.pool and self._free(d):
                self._add(d)
        self.query_scenes.add(skey)
        if self.split == "test":
            self.ctx.test_scenes.update(s.key() for s in p.uses)
        self.queries.append((p.query, key))
        return True

    def build(self, n_queries: int, pool_size: int, n_dis: int) -> _TaskData:
        tries = 0
        while len(self.queries) < n_queries:
            tries += 1
            if tries > 200 + 50 * n_queries:
                raise RuntimeError(f"toy {self.split} {self.spec.name}: only {len(self.queries)} queries fit")
            self.offer(self.family.propose(self.rng, self.spec.dataset, n_dis))
        size = sum(len(v) for v in self.pool.values())
        for _ in range(20 * pool_size):
            if size >= pool_size:
                break
            c = self.family.filler(self.rng, self.spec.dataset)
            if c.key not in self.pool and self._free(c):
                self._add(c)
                size += 1
        return self._number()

    def _number(self) -> _TaskData:
        ctx, spec = self.ctx, self.spec
        cands = [c for k in self.pool for c in self.pool[k]]
        self.rng.shuffle(cands)
        rows = []
        for c in cands:
            c.did = ctx.next_did(spec.dataset_id)
            if c.scene is not None:
                c.img_path = ctx.image(spec.dataset, self.split, c.scene)
            src = {"toy": {"attrs": c.attrs, **({"scene": c.scene.to_json()} if c.scene else {})}}
            rows.append(
                {
                    "did": c.did,
                    "txt": c.txt,
                    "img_path": c.img_path,
                    "modality": spec.cand_modality,
                    "src_content": json.dumps(src, sort_keys=True),
                }
            )
        queries = []
        for q, key in self.queries:
            img = ctx.image(spec.dataset, self.split, q.scene) if q.scene is not None else None
            pos = sorted((c.did for c in self.pool[key]), key=mbeir.split_id)
            info = {**q.info, "task": spec.name, "target": json.loads(key)}
            queries.append(
                {
                    "qid": ctx.next_qid(spec.dataset_id),
                    "query_txt": q.txt,
                    "query_img_path": img,
                    "query_modality": spec.query_modality,
                    "query_src_content": json.dumps({"toy": info}, sort_keys=True),
                    "pos_cand_list": pos,
                    "neg_cand_list": [],
                    "task_id": spec.task_id,
                }
            )
        return _TaskData(spec, queries, rows)


# ----------------------------------------------------------------------------------------------
# Pretraining pairs (progressive transition)
# ----------------------------------------------------------------------------------------------


def _pretrain(ctx: _Ctx, preset: Preset) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """SimCSE-like NLI triples and CC3M-like caption/image pairs, never about a test scene."""
    rng = random.Random(f"{ctx.seed}:pretrain")
    nli: list[dict[str, str]] = []
    while len(nli) < preset.nli_pairs:
        s = sc.sample_scene(rng, "mixed")
        if s.key() in ctx.test_scenes:
            continue
        a = sc.caption(s, rng, "plain")
        b = sc.caption(s, rng, rng.choice(("plain", "news", "passage")))
        if a == b:
            continue
        neg = sc.apply_mutation(s, sc.sample_mutations(rng, s, 1)[0])
        nli.append({"sent0": a, "sent1": b, "hard_neg": sc.caption(neg, rng, "plain")})
    caps: list[dict[str, str]] = []
    while len(caps) < preset.caption_pairs:
        s = sc.sample_scene(rng, "mixed")
        if s.key() in ctx.test_scenes:
            continue
        path = f"pretrain/images/{len(caps) + 1:06d}.png"
        ctx.images.append(_ImageJob(path, s))
        caps.append({"caption": sc.caption(s, rng, rng.choice(("plain", "news"))), "img_path": path})
    return nli, caps


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _render_one(job: tuple[str, Scene, int]) -> bytes:
    path, scene, seed = job
    return sc.encode_png(sc.render(scene, f"{seed}|{path}"))


def _write_images(root: Path, ctx: _Ctx, workers: int) -> None:
    jobs = [(j.path, j.scene, ctx.seed) for j in ctx.images]
    for d in sorted({str(Path(p).parent) for p, _, _ in jobs}):
        (root / d).mkdir(parents=True, exist_ok=True)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            blobs = pool.imap(_render_one, jobs, chunksize=256)
            for (p, _, _), b in zip(jobs, blobs, strict=True):
                (root / p).write_bytes(b)
    else:
        for job in jobs:
            (root / job[0]).write_bytes(_render_one(job))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def _prepare_out(out: Path) -> None:
    """Refuse to write into a foreign non-empty directory; clear a previous toy build's files."""
    if out.exists() and any(out.iterdir()):
        if not (out / INFO_FILE).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {INFO_FILE}; refusing to write there")
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def instruction_rows() -> list[instructions.InstructionRow]:
    """The 16 instruction rows in MBEIR_TASKS order."""
    return [
        instructions.InstructionRow(t.query_modality, t.cand_modality, t.dataset, t.dataset_id, INSTRUCTIONS[t.name])
        for t in catalogue.MBEIR_TASKS
    ]


def make_toy_mbeir(
    out: str | Path, size: str = "small", seed: int = 0, workers: int = 1, preset: Preset | None = None
) -> Path:
    """Write the toy M-BEIR benchmark under `out` and return it (see the module doc for guarantees).

    `workers` > 1 renders images in that many processes (the bytes do not depend on it); `preset`
    overrides the sizes of `size` (tests use a tiny one to keep determinism checks cheap).
    """
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(PRESETS)}")
    preset = preset or PRESETS[size]
    out = Path(out)
    _prepare_out(out)
    ctx = _Ctx(seed=int(seed))

    tests = [
        _TaskBuilder(ctx, t, "test").build(preset.test_queries, preset.test_pool, preset.test_distractors)
        for t in catalogue.MBEIR_TASKS
    ]
    trains = [
        _TaskBuilder(ctx, t, "train").build(preset.train_queries, 0, preset.train_distractors)
        for t in catalogue.MBEIR_TASKS
    ]
    nli, caps = _pretrain(ctx, preset)

    union: list[dict[str, Any]] = []
    for td in tests:
        writers.write_queries(out / td.spec.query_file, td.queries)
        writers.write_pool(out / td.spec.pool_file, td.pool)
        writers.write_qrels(out / td.spec.qrels_file, writers.qrels_from_queries(td.queries))
        union.extend(td.pool)
    writers.write_pool(out / mbeir.GLOBAL_POOL_FILE, union)
    train_q = [q for td in trains for q in td.queries]
    writers.write_queries(out / mbeir.TRAIN_QUERY_FILE, train_q)
    writers.write_pool(out / mbeir.TRAIN_POOL_FILE, [c for td in trains for c in td.pool])
    writers.write_qrels(out / TRAIN_QRELS_FILE, writers.qrels_from_queries(train_q))
    instructions.write_instructions(out / mbeir.INSTRUCTIONS_FILE, instruction_rows())
    _write_jsonl(out / NLI_FILE, nli)
    _write_jsonl(out / CAPTION_FILE, caps)
    _write_images(out, ctx, workers)

    info = {
        "generator": "umarvel_ray.data.toy.builder",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": size,
        "preset": asdict(preset),
        "world": {
            "colors": list(sc.COLORS),
            "shapes": list(sc.SHAPES),
            "sizes": list(sc.SIZES),
            "textures": list(sc.TEXTURES),
            "counts": list(sc.COUNTS),
            "positions": list(sc.POSITIONS),
            "backgrounds": list(sc.BACKGROUNDS),
            "image_size": sc.IMAGE_SIZE,
            "datasets": WORLD,
        },
        "test": {
            td.spec.name: {
                "queries": len(td.queries),
                "pool": len(td.pool),
                "positives": sum(len(q["pos_cand_list"]) for q in td.queries),
                "multi_positive_queries": sum(len(q["pos_cand_list"]) > 1 for q in td.queries),
                "k": td.spec.k,
            }
            for td in tests
        },
        "union_test_pool": len(union),
        "train": {
            "queries": len(train_q),
            "pool": sum(len(td.pool) for td in trains),
            "by_task": {td.spec.name: len(td.queries) for td in trains},
        },
        "pretrain": {"nli_pairs": len(nli), "caption_pairs": len(caps)},
        "images": len(ctx.images),
        "notes": (
            "Toy content in the real M-BEIR layout. src_content holds the ground truth under 'toy'. "
            "Train and test queries share no scene; positives are complete within each split."
        ),
    }
    (out / INFO_FILE).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    return out
