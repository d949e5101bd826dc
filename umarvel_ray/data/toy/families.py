"""One family per toy task: a proposer (a query with its positives and hard distractors) and a
filler (one more pool candidate), by task id and dataset (`FAMILIES`).

A proposal is accepted or rejected as a whole by the task builder (`builder`), which owns the
rules that keep positives complete and train apart from test; the proposers only make content:
scenes from the dataset's `WORLD`, wordings from `words` and `texts`, and one-attribute edits of
the query's scene as the hard distractors.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from umarvel_ray.data.toy import scenes as sc
from umarvel_ray.data.toy import words
from umarvel_ray.data.toy.scenes import Group, Mutation, Scene
from umarvel_ray.data.toy.texts import (
    OBJ_ATTRS,
    cirr_text,
    fiq_phrase,
    infoseek_text,
    oven_name,
    oven_passage,
    oven_question,
)

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


@dataclass
class Cand:
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
class Query:
    txt: str | None
    scene: Scene | None  # drawn into the query image
    info: dict[str, Any]


@dataclass
class Proposal:
    """One query with its positives and hard distractors, accepted or rejected as a whole."""

    query: Query
    uses: list[Scene]  # scenes this query is about (claimed by test, forbidden for train)
    positives: list[Cand]
    distractors: list[Cand]


def _scene_cand(scene: Scene, txt: str | None = None, draw: bool = True) -> Cand:
    return Cand(attrs=scene.attrs(), txt=txt, scene=scene if draw else None, about=scene)


def _pick_mutations(
    rng: random.Random, scene: Scene, n: int, attrs: tuple[str, ...] | None = None
) -> list[Mutation]:
    return sc.sample_mutations(rng, scene, n, attrs)


def _rng_keep(rng: random.Random, k: int, items: list[Any]) -> list[Any]:
    return rng.sample(items, min(k, len(items)))


def _group_attrs(g: Group, prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{k}": v for k, v in g.attrs(with_position=False).items()}


# ----------------------------------------------------------------------------------------------
# One proposer per task family: (rng, dataset) -> Proposal, and a filler candidate maker
# ----------------------------------------------------------------------------------------------


def _several(rng: random.Random, p: float = 0.25) -> int:
    return 2 if rng.random() < p else 1


def _prop_t2i(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = Query(words.caption(s, rng, CAPTION_STYLE[ds]), None, {"scene": s.to_json()})
    pos = [_scene_cand(s) for _ in range(_several(rng))]
    dis = [_scene_cand(sc.apply_mutation(s, m)) for m in _pick_mutations(rng, s, n_dis)]
    return Proposal(q, [s], pos, dis)


def _distinct_captions(scene: Scene, rng: random.Random, style: str, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(20 * n):
        t = words.caption(scene, rng, style)
        if t not in out:
            out.append(t)
        if len(out) == n:
            break
    return out


def _prop_i2t(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    style = CAPTION_STYLE[ds]
    n_pos = rng.choice((1, 2, 2, 3)) if ds == "MSCOCO" else 1
    pos = [_scene_cand(s, t, draw=False) for t in _distinct_captions(s, rng, style, n_pos)]
    dis = [
        _scene_cand(d, words.caption(d, rng, style), draw=False)
        for d in (sc.apply_mutation(s, m) for m in _pick_mutations(rng, s, n_dis))
    ]
    return Proposal(Query(None, s, {"scene": s.to_json()}), [s], pos, dis)


def _prop_t2t(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = Query(words.caption(s, rng, "question"), None, {"scene": s.to_json()})
    pos = [_scene_cand(s, words.caption(s, rng, "passage"), draw=False)]
    dis = [
        _scene_cand(d, words.caption(d, rng, "passage"), draw=False)
        for d in (sc.apply_mutation(s, m) for m in _pick_mutations(rng, s, n_dis))
    ]
    return Proposal(q, [s], pos, dis)


def _t2it_cand(s: Scene, rng: random.Random, ds: str, index: int | None = None) -> Cand:
    i = rng.randrange(len(s.groups)) if index is None else index
    style = "headline" if ds == "EDIS" else "caption"
    return _scene_cand(s, words.partial_text(s, i, rng, style))


def _prop_t2it(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    q = Query(words.caption(s, rng, "news" if ds == "EDIS" else "question"), None, {"scene": s.to_json()})
    n_pos = _several(rng)
    pos = [_t2it_cand(s, rng, ds, (k if n_pos == 2 else None)) for k in range(n_pos)]
    dis = [_t2it_cand(sc.apply_mutation(s, m), rng, ds) for m in _pick_mutations(rng, s, n_dis)]
    return Proposal(q, [s], pos, dis)


def _prop_i2i(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    pos = [_scene_cand(s) for _ in range(_several(rng, 0.3))]
    dis = [_scene_cand(sc.apply_mutation(s, m)) for m in _pick_mutations(rng, s, n_dis)]
    return Proposal(Query(None, s, {"scene": s.to_json()}), [s], pos, dis)


def _oven_cand(g: Group, rng: random.Random, with_image: bool) -> Cand:
    if with_image:
        return Cand(
            attrs={"kind": "group", **_group_attrs(g)}, txt=oven_name(g, rng), scene=sc.group_scene(g)
        )
    return Cand(attrs={"kind": "group", **_group_attrs(g)}, txt=oven_passage(g, rng))


def _prop_oven(rng: random.Random, ds: str, n_dis: int, with_image: bool) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    i = rng.randrange(len(s.groups))
    g = s.groups[i]
    q = Query(oven_question(s, i, rng), s, {"scene": s.to_json(), "group": i})
    pos = [_oven_cand(g, rng, with_image)]
    single = sc.make_scene("white", [g])
    dis = [
        _oven_cand(sc.apply_mutation(single, m).groups[0], rng, with_image)
        for m in _pick_mutations(rng, single, n_dis, OBJ_ATTRS)
    ]
    dis += [_oven_cand(h, rng, with_image) for j, h in enumerate(s.groups) if j != i]
    return Proposal(q, [s], pos, dis)


def _infoseek_cand(
    s: Scene, i: int, asked: str, ident: dict[str, str], rng: random.Random, with_image: bool
) -> tuple[str, Cand]:
    q, ans, key = infoseek_text(s, i, asked, ident, rng)
    g = s.groups[i]
    if with_image:
        key.pop("plural", None)  # implied by the drawn count
        return q, Cand(attrs={**key, **_group_attrs(g, "g.")}, txt=ans, scene=sc.group_scene(g))
    return q, Cand(attrs={**key, "value": str(getattr(g, asked))}, txt=ans)


def _prop_infoseek(rng: random.Random, ds: str, n_dis: int, with_image: bool) -> Proposal:
    """Question about one attribute of one group; distractors keep the reference and change the answer
    (and, with images, also keep the answer but change another attribute of the drawn object)."""
    s = sc.sample_scene(rng, WORLD[ds])
    i = rng.randrange(len(s.groups))
    asked = rng.choice(OBJ_ATTRS)
    ident = rng.choice(words.refer_options(s, i, avoid=(asked,)))
    q, pos = _infoseek_cand(s, i, asked, ident, rng, with_image)
    query = Query(q, s, {"scene": s.to_json(), "group": i, "asked": asked, "ident": ident})
    edits = [m for m in sc.mutations(s, (asked,)) if m.group == i]
    picks = _rng_keep(rng, max(1, n_dis - 1) if with_image else n_dis, edits)
    if with_image:
        keep = tuple(a for a in OBJ_ATTRS if a != asked and a not in ident)
        picks += _rng_keep(rng, 1, [m for m in sc.mutations(s, keep) if m.group == i])
    dis = [_infoseek_cand(sc.apply_mutation(s, m), i, asked, ident, rng, with_image)[1] for m in picks]
    return Proposal(query, [s], [pos], dis)


def _cirr_cands(scenes: list[Scene]) -> list[Cand]:
    return [_scene_cand(x) for x in scenes]


def _prop_cirr(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    (m,) = sc.sample_mutations(rng, s, 1)
    t = sc.apply_mutation(s, m)
    q = Query(cirr_text(s, m, rng), s, {"scene": s.to_json(), "target_scene": t.to_json()})
    pos = _cirr_cands([t] * _several(rng))
    same_attr = [x for x in sc.mutations(s, (m.attr,)) if x.group == m.group and x.new != m.new]
    dis_scenes = [s] + [sc.apply_mutation(s, x) for x in _rng_keep(rng, 1, same_attr)]
    more = max(0, n_dis - len(dis_scenes))
    t_edits = [x for x in sc.sample_mutations(rng, t, more + 1) if sc.apply_mutation(t, x) != s]
    dis_scenes += [sc.apply_mutation(t, x) for x in t_edits[:more]]
    return Proposal(q, [s, t], pos, _cirr_cands(dis_scenes))


def _prop_fashioniq(rng: random.Random, ds: str, n_dis: int) -> Proposal:
    s = sc.sample_scene(rng, WORLD[ds])
    (m1,) = sc.sample_mutations(rng, s, 1)
    mid = sc.apply_mutation(s, m1)
    others = tuple(a for a in (*sc.GROUP_ATTRS, "position", "background") if a != m1.attr)
    (m2,) = sc.sample_mutations(rng, mid, 1, others)
    t = sc.apply_mutation(mid, m2)
    text = f"{fiq_phrase(t, m1, rng)} and {fiq_phrase(t, m2, rng)}"
    q = Query(text, s, {"scene": s.to_json(), "target_scene": t.to_json()})
    # each edit alone and the reference itself, then other one-attribute edits of the target
    dis_scenes = [mid, sc.apply_mutation(s, m2), s]
    rest = tuple(a for a in others if a != m2.attr)
    dis_scenes += [sc.apply_mutation(t, x) for x in sc.sample_mutations(rng, t, max(0, n_dis - 2), rest)]
    return Proposal(q, [s, t], _cirr_cands([t] * _several(rng)), _cirr_cands(dis_scenes))


@dataclass(frozen=True)
class Family:
    propose: Callable[[random.Random, str, int], Proposal]
    filler: Callable[[random.Random, str], Cand]


def _fill_scene_image(rng: random.Random, ds: str) -> Cand:
    return _scene_cand(sc.sample_scene(rng, WORLD[ds]))


def _fill_caption(rng: random.Random, ds: str) -> Cand:
    s = sc.sample_scene(rng, WORLD[ds])
    return _scene_cand(s, words.caption(s, rng, CAPTION_STYLE[ds]), draw=False)


def _fill_passage(rng: random.Random, ds: str) -> Cand:
    s = sc.sample_scene(rng, WORLD[ds])
    return _scene_cand(s, words.caption(s, rng, "passage"), draw=False)


def _fill_t2it(rng: random.Random, ds: str) -> Cand:
    return _t2it_cand(sc.sample_scene(rng, WORLD[ds]), rng, ds)


def _fill_oven(with_image: bool) -> Callable[[random.Random, str], Cand]:
    def fill(rng: random.Random, ds: str) -> Cand:
        return _oven_cand(sc.sample_group(rng, "center"), rng, with_image)

    return fill


def _fill_infoseek(with_image: bool) -> Callable[[random.Random, str], Cand]:
    def fill(rng: random.Random, ds: str) -> Cand:
        s = sc.sample_scene(rng, WORLD[ds])
        i = rng.randrange(len(s.groups))
        asked = rng.choice(OBJ_ATTRS)
        ident = rng.choice(words.refer_options(s, i, avoid=(asked,)))
        return _infoseek_cand(s, i, asked, ident, rng, with_image)[1]

    return fill


FAMILIES: dict[int, dict[str, Family]] = {
    0: {d: Family(_prop_t2i, _fill_scene_image) for d in ("VisualNews", "MSCOCO", "Fashion200K")},
    1: {"WebQA": Family(_prop_t2t, _fill_passage)},
    2: {d: Family(_prop_t2it, _fill_t2it) for d in ("EDIS", "WebQA")},
    3: {d: Family(_prop_i2t, _fill_caption) for d in ("VisualNews", "MSCOCO", "Fashion200K")},
    4: {"NIGHTS": Family(_prop_i2i, _fill_scene_image)},
    6: {
        "OVEN": Family(lambda r, d, n: _prop_oven(r, d, n, False), _fill_oven(False)),
        "InfoSeek": Family(lambda r, d, n: _prop_infoseek(r, d, n, False), _fill_infoseek(False)),
    },
    7: {
        "FashionIQ": Family(_prop_fashioniq, _fill_scene_image),
        "CIRR": Family(_prop_cirr, _fill_scene_image),
    },
    8: {
        "OVEN": Family(lambda r, d, n: _prop_oven(r, d, n, True), _fill_oven(True)),
        "InfoSeek": Family(lambda r, d, n: _prop_infoseek(r, d, n, True), _fill_infoseek(True)),
    },
}
