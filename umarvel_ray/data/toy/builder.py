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

Here: the sizes (`PRESETS`), the per-task builder that accepts proposals under those rules, the
pretraining pairs and the writing. The content comes from `families` (one proposer per task),
`texts` and `words` (wordings), `scenes` (the world and its edits), `drawing` (the images) and
`prompts` (the instruction tsv).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.data import catalogue, instructions, mbeir, writers
from umarvel_ray.data.toy import drawing, words
from umarvel_ray.data.toy import scenes as sc
from umarvel_ray.data.toy.families import FAMILIES, WORLD, Cand, Proposal, Query
from umarvel_ray.data.toy.prompts import instruction_rows
from umarvel_ray.data.toy.scenes import Scene

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
        self.pool: dict[str, list[Cand]] = {}
        self.queries: list[tuple[Query, str]] = []
        self.query_scenes: set[str] = set()

    def _forbidden(self, scene: Scene | None) -> bool:
        return self.split != "test" and scene is not None and scene.key() in self.ctx.test_scenes

    def _free(self, c: Cand) -> bool:
        """The content is not owned by another task's pool of this split and not a test scene here."""
        owner = self.registry.get((self.spec.cand_modality, c.key))
        return (owner is None or owner == self.spec.name) and not self._forbidden(c.about)

    def _add(self, c: Cand) -> None:
        self.registry[(self.spec.cand_modality, c.key)] = self.spec.name
        self.pool.setdefault(c.key, []).append(c)

    def offer(self, p: Proposal) -> bool:
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
        a = words.caption(s, rng, "plain")
        b = words.caption(s, rng, rng.choice(("plain", "news", "passage")))
        if a == b:
            continue
        neg = sc.apply_mutation(s, sc.sample_mutations(rng, s, 1)[0])
        nli.append({"sent0": a, "sent1": b, "hard_neg": words.caption(neg, rng, "plain")})
    caps: list[dict[str, str]] = []
    while len(caps) < preset.caption_pairs:
        s = sc.sample_scene(rng, "mixed")
        if s.key() in ctx.test_scenes:
            continue
        path = f"pretrain/images/{len(caps) + 1:06d}.png"
        ctx.images.append(_ImageJob(path, s))
        caps.append({"caption": words.caption(s, rng, rng.choice(("plain", "news"))), "img_path": path})
    return nli, caps


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _render_one(job: tuple[str, Scene, int]) -> bytes:
    path, scene, seed = job
    return drawing.encode_png(drawing.render(scene, f"{seed}|{path}"))


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