"""The toy M-BEIR must be a faithful M-BEIR directory, deterministic, leak-free and learnable.

Learnability is checked without a neural model: an oracle that reads the attribute words of the
texts (words.LEXICON) and the true scene of each image ranks the positives first, random ranking
does not, and every positive has a one-attribute hard distractor in its pool.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from umarvel_ray.data import catalogue, instructions, mbeir, model_items
from umarvel_ray.data.toy import drawing, words
from umarvel_ray.data.toy import scenes as sc
from umarvel_ray.data.toy.builder import (
    CAPTION_FILE,
    INFO_FILE,
    NLI_FILE,
    TRAIN_QRELS_FILE,
    Preset,
    make_toy_mbeir,
)

TINY = Preset(
    test_queries=4,
    test_pool=12,
    test_distractors=2,
    train_queries=3,
    train_distractors=1,
    nli_pairs=5,
    caption_pairs=5,
)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _toy(src: str | None) -> dict:
    return json.loads(src)["toy"]


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def toy(toy_mbeir_dir: Path) -> dict:
    """Everything read once: test queries/pools per task, union pool, train queries/pool."""
    root = Path(toy_mbeir_dir)
    tasks = {
        t.name: {"queries": _jsonl(root / t.query_file), "pool": _jsonl(root / t.pool_file)}
        for t in catalogue.MBEIR_TASKS
    }
    return {
        "root": root,
        "tasks": tasks,
        "union": _jsonl(root / mbeir.GLOBAL_POOL_FILE),
        "train_q": _jsonl(root / mbeir.TRAIN_QUERY_FILE),
        "train_pool": _jsonl(root / mbeir.TRAIN_POOL_FILE),
    }


# ----------------------------------------------------------------------------------------------
# The scene world on its own
# ----------------------------------------------------------------------------------------------


def test_mutations_change_exactly_one_attribute_and_render_deterministically():
    rng = random.Random(3)
    for world in sc.WORLDS:
        for _ in range(30):
            s = sc.sample_scene(rng, world)
            ms = sc.mutations(s)
            assert ms
            for m in ms:
                assert sc.attr_distance(s.attrs(), sc.apply_mutation(s, m).attrs()) == 1, m
    s = sc.sample_scene(random.Random(1), "double")
    a, b = drawing.encode_png(drawing.render(s, "x")), drawing.encode_png(drawing.render(s, "x"))
    assert a == b
    assert drawing.render(s, "x").size == (sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    # one-attribute edits are visible in pixels
    m = sc.mutations(s, ("color",))[0]
    assert drawing.render(sc.apply_mutation(s, m), "x").tobytes() != drawing.render(s, "x").tobytes()


def _text_bag(text: str) -> Counter:
    """Attribute words of a text (positions and the optional word 'solid/plain' ignored)."""
    bag: Counter = Counter()
    for tok in re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower()):
        if tok in words.LEXICON:
            attr, val = words.LEXICON[tok]
            if attr != "position" and not (attr == "texture" and val == "solid"):
                bag[(attr, val)] += 1
    return bag


def _scene_bag(scene: dict) -> Counter:
    bag: Counter = Counter({("background", scene["background"]): 1})
    for g in scene["groups"]:
        bag.update([("color", g["color"]), ("shape", g["shape"]), ("size", g["size"])])
        if g["texture"] != "solid":
            bag[("texture", g["texture"])] += 1
        if g["count"] == "2":
            bag[("count", "2")] += 1
    return bag


@pytest.mark.parametrize("style", ["plain", "news", "question", "passage"])
def test_captions_name_every_attribute(style):
    rng = random.Random(7)
    seen = set()
    for _ in range(200):
        s = sc.sample_scene(rng, "mixed")
        text = words.caption(s, rng, style)
        seen.add(text)
        assert _text_bag(text) == _scene_bag(s.to_json()), text
    assert len(seen) == 200
    s = sc.sample_scene(random.Random(0), "single")
    assert _text_bag(words.caption(s, rng, "product")) == _scene_bag(s.to_json())


def test_refer_picks_exactly_one_group():
    rng = random.Random(5)
    for _ in range(100):
        s = sc.sample_scene(rng, "double")
        for i in range(2):
            for ident in words.refer_options(s, i, avoid=("color",)):
                assert "color" not in ident
                hits = [g for g in s.groups if all(str(getattr(g, k)) == v for k, v in ident.items())]
                assert hits == [s.groups[i]]


# ----------------------------------------------------------------------------------------------
# Layout and format
# ----------------------------------------------------------------------------------------------


def test_layout_task_ids_and_modalities(toy):
    root = toy["root"]
    for t in catalogue.MBEIR_TASKS:
        for rel in (t.query_file, t.pool_file, t.qrels_file):
            assert (root / rel).is_file(), rel
        qs, pool = toy["tasks"][t.name]["queries"], toy["tasks"][t.name]["pool"]
        assert 30 <= len(qs) <= 60 and 100 <= len(pool) <= 300, t.name
        qm, cm = t.query_modality, t.cand_modality
        for q in qs:
            assert q["task_id"] == t.task_id and q["query_modality"] == qm
            assert mbeir.split_id(q["qid"])[0] == t.dataset_id
            assert (q["query_txt"] is not None) == ("text" in qm)
            assert (q["query_img_path"] is not None) == ("image" in qm)
            assert q["neg_cand_list"] == []
        assert {c["modality"] for c in pool} == {cm}, t.name
        for c in pool:
            assert mbeir.split_id(c["did"])[0] == t.dataset_id
            assert (c["txt"] is not None) == ("text" in cm) and (c["img_path"] is not None) == ("image" in cm)
    task_ids = {q["task_id"] for t in toy["tasks"].values() for q in t["queries"]}
    assert task_ids == {0, 1, 2, 3, 4, 6, 7, 8}
    for rel in (mbeir.GLOBAL_POOL_FILE, mbeir.TRAIN_QUERY_FILE, mbeir.TRAIN_POOL_FILE, TRAIN_QRELS_FILE):
        assert (root / rel).is_file(), rel


def test_validate_dir_is_clean(toy):
    from umarvel_ray.data.validate import validate_dir

    report = validate_dir(toy["root"], check_images=True)
    assert report.ok, report.format()
    assert len(report.positives) == 17  # 16 tasks + union train
    for p in report.positives:
        assert p.missing_local == 0 and p.missing_union == 0 and p.qrels_mismatch == 0, p.line()


def test_images_are_small_rgb(toy):
    root = toy["root"]
    paths = [c["img_path"] for c in toy["union"] if c["img_path"]][::97]
    paths += [q["query_img_path"] for q in toy["train_q"] if q["query_img_path"]][::97]
    assert len(paths) > 20
    for rel in paths:
        assert rel.startswith("mbeir_images/") and rel.endswith(".png")
        with Image.open(root / rel) as im:
            assert im.size == (84, 84) and im.mode == "RGB"
        assert (root / rel).stat().st_size < 4000


def test_instructions_cover_every_dataset_task_pair(toy):
    ins = instructions.read_instructions(toy["root"] / mbeir.INSTRUCTIONS_FILE)
    assert len(ins) == 16
    used = {
        (mbeir.split_id(q["qid"])[0], q["query_modality"], catalogue.task_modalities(q["task_id"])[1])
        for qs in [*(t["queries"] for t in toy["tasks"].values()), toy["train_q"]]
        for q in qs
    }
    assert len(used) == 16
    for ds, qm, cm in used:
        prompts = ins.prompts(ds, qm, cm)
        assert len(prompts) == 4 and len(set(prompts)) == 4
        assert all(p[0].isupper() and p.endswith(".") for p in prompts)
    q = toy["tasks"]["cirr_task7"]["queries"][0]
    item = model_items.query_item(q, ins, prompt_index=1)
    assert item["instruction"] == ins.prompts(8, "image,text", "image")[1] and item["image"]


# ----------------------------------------------------------------------------------------------
# Pools and labels
# ----------------------------------------------------------------------------------------------


def test_union_pool_is_the_union_of_local_pools(toy):
    root = toy["root"]
    concat = "".join((root / t.pool_file).read_text(encoding="utf-8") for t in catalogue.MBEIR_TASKS)
    assert (root / mbeir.GLOBAL_POOL_FILE).read_text(encoding="utf-8") == concat
    ids = [c["did"] for c in toy["union"]]
    assert len(ids) == len(set(ids))


def test_positives_in_local_and_union_pools_and_qrels(toy):
    root = toy["root"]
    union = {c["did"] for c in toy["union"]}
    for t in catalogue.MBEIR_TASKS:
        local = {c["did"] for c in toy["tasks"][t.name]["pool"]}
        qs = toy["tasks"][t.name]["queries"]
        for q in qs:
            assert (
                q["pos_cand_list"] and set(q["pos_cand_list"]) <= local and set(q["pos_cand_list"]) <= union
            )
        qrels = mbeir.read_qrels(root / t.qrels_file)
        assert qrels == {q["qid"]: set(q["pos_cand_list"]) for q in qs}
    multi = sum(len(q["pos_cand_list"]) > 1 for t in toy["tasks"].values() for q in t["queries"])
    assert multi >= 50


def _content_index(pool: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for c in pool:
        out.setdefault((c["modality"], sc.canonical(_toy(c["src_content"])["attrs"])), set()).add(c["did"])
    return out


def test_positives_are_complete_locally_and_globally(toy):
    """Key oracle: exactly the labelled positives carry the query's target content, in the local pool
    and in the whole union pool of that modality, so local and global recall are both exact."""
    union_index = _content_index(toy["union"])
    for t in catalogue.MBEIR_TASKS:
        local_index = _content_index(toy["tasks"][t.name]["pool"])
        for q in toy["tasks"][t.name]["queries"]:
            key = (t.cand_modality, sc.canonical(_toy(q["query_src_content"])["target"]))
            assert local_index[key] == set(q["pos_cand_list"]), (t.name, q["qid"])
            assert union_index[key] == set(q["pos_cand_list"]), (t.name, q["qid"])
    train_index = _content_index(toy["train_pool"])
    for q in toy["train_q"]:
        key = (catalogue.task_modalities(q["task_id"])[1], sc.canonical(_toy(q["query_src_content"])["target"]))
        assert train_index[key] == set(q["pos_cand_list"]), q["qid"]


def test_every_positive_has_a_one_attribute_distractor(toy):
    for t in catalogue.MBEIR_TASKS:
        pool = {c["did"]: _toy(c["src_content"])["attrs"] for c in toy["tasks"][t.name]["pool"]}
        for q in toy["tasks"][t.name]["queries"]:
            pos = set(q["pos_cand_list"])
            target = pool[q["pos_cand_list"][0]]
            near = [d for d, a in pool.items() if d not in pos and sc.attr_distance(a, target) == 1]
            assert near, (t.name, q["qid"])


def _random_hit_rate(n: int, p: int, k: int) -> float:
    return 1.0 - math.comb(n - p, k) / math.comb(n, k)


def test_oracle_reading_attributes_wins_and_random_loses(toy):
    """Tasks 0-3 (text on one side): matching attribute words against true scene content ranks a
    positive within the top k for almost every query; random ranking almost never does."""
    for t in catalogue.MBEIR_TASKS:
        if t.task_id not in (0, 1, 2, 3):
            continue
        pool = toy["tasks"][t.name]["pool"]
        cand_bags = [
            (
                c["did"],
                _scene_bag(_toy(c["src_content"])["scene"]) if c["img_path"] else _text_bag(c["txt"]),
            )
            for c in pool
        ]
        hits, rand = 0, 0.0
        qs = toy["tasks"][t.name]["queries"]
        for q in qs:
            qbag = (
                _text_bag(q["query_txt"])
                if q["query_txt"]
                else _scene_bag(_toy(q["query_src_content"])["scene"])
            )
            scores = {d: -sum(((qbag - b) + (b - qbag)).values()) for d, b in cand_bags}
            pos = set(q["pos_cand_list"])
            best = max(scores[d] for d in pos)
            # pessimistic ties: every tied non-positive ranks first
            rank = sum(1 for d, s in scores.items() if s > best or (s == best and d not in pos))
            hits += rank < t.k
            rand += _random_hit_rate(len(pool), len(pos), t.k)
        assert hits / len(qs) >= 0.9, (t.name, hits / len(qs))
        assert rand / len(qs) <= 0.15, (t.name, rand / len(qs))


# ----------------------------------------------------------------------------------------------
# Train / test separation and train data
# ----------------------------------------------------------------------------------------------


def _scene_json_key(s: dict) -> str:
    groups = [sc.Group(**{**g, "count": int(g["count"])}) for g in s["groups"]]
    return sc.make_scene(s["background"], groups).key()


def _scenes_of(q: dict) -> set[str]:
    """Keys of the scenes a query is about: the query's own scene and a scene-valued target."""
    info = _toy(q["query_src_content"])
    keys = {_scene_json_key(info["scene"])} if "scene" in info else set()
    if "background" in info["target"]:
        keys.add(sc.canonical(info["target"]))
    return keys


def test_train_and_test_queries_are_disjoint(toy):
    test_q = [q for t in toy["tasks"].values() for q in t["queries"]]
    test_scenes = set().union(*(_scenes_of(q) for q in test_q))
    train_scenes = set().union(*(_scenes_of(q) for q in toy["train_q"]))
    assert len(test_scenes) > 500 and len(train_scenes) > 2000
    assert not test_scenes & train_scenes
    # no test scene anywhere in the train pool either
    pool_scenes = {
        sc.canonical(a)
        for a in (_toy(c["src_content"])["attrs"] for c in toy["train_pool"])
        if "background" in a
    }
    assert not test_scenes & pool_scenes
    imgs = lambda qs: {q["query_img_path"] for q in qs if q["query_img_path"]}  # noqa: E731
    assert not imgs(test_q) & imgs(toy["train_q"])
    test_pool_imgs = {c["img_path"] for c in toy["union"] if c["img_path"]}
    assert not test_pool_imgs & {c["img_path"] for c in toy["train_pool"] if c["img_path"]}
    describing = lambda qs: {q["query_txt"] for q in qs if q["task_id"] in (0, 1, 2)}  # noqa: E731
    assert not describing(test_q) & describing(toy["train_q"])
    qids = [q["qid"] for q in test_q + toy["train_q"]]
    assert len(qids) == len(set(qids))
    dids = [c["did"] for c in toy["union"] + toy["train_pool"]]
    assert len(dids) == len(set(dids))


def test_train_queries_cover_all_task_types(toy):
    root = toy["root"]
    train_q, pool = toy["train_q"], {c["did"] for c in toy["train_pool"]}
    assert 2000 <= len(train_q) <= 4000
    assert {q["task_id"] for q in train_q} == {0, 1, 2, 3, 4, 6, 7, 8}
    assert {mbeir.split_id(q["qid"])[0] for q in train_q} == set(range(10))
    for q in train_q:
        assert q["neg_cand_list"] == [] and set(q["pos_cand_list"]) <= pool
    assert mbeir.read_qrels(root / TRAIN_QRELS_FILE) == {q["qid"]: set(q["pos_cand_list"]) for q in train_q}
    # the readers used by the pipelines accept the files
    assert mbeir.read_queries(root / mbeir.TRAIN_QUERY_FILE).num_rows == len(train_q)
    assert mbeir.read_pool(root / mbeir.TRAIN_POOL_FILE).num_rows == len(toy["train_pool"])


def test_pretrain_pairs_and_info(toy):
    root = toy["root"]
    nli, caps = _jsonl(root / NLI_FILE), _jsonl(root / CAPTION_FILE)
    assert 1000 <= len(nli) <= 2000 and 1000 <= len(caps) <= 2000
    for r in nli[:200]:
        assert set(r) == {"sent0", "sent1", "hard_neg"}
        assert r["sent0"] != r["sent1"] and _text_bag(r["sent0"]) == _text_bag(r["sent1"])
    for r in caps[:50]:
        assert set(r) == {"caption", "img_path"} and (root / r["img_path"]).is_file()
    info = json.loads((root / INFO_FILE).read_text())
    assert info["seed"] == 0 and info["size"] == "small"
    assert info["union_test_pool"] == len(toy["union"]) and info["train"]["queries"] == len(toy["train_q"])
    for t in catalogue.MBEIR_TASKS:
        assert info["test"][t.name]["queries"] == len(toy["tasks"][t.name]["queries"])
    n_images = sum(1 for _ in (root / "mbeir_images").rglob("*.png")) + sum(
        1 for _ in (root / "pretrain/images").glob("*.png")
    )
    assert info["images"] == n_images


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical(toy_mbeir_dir, tmp_path):
    again = make_toy_mbeir(tmp_path / "again", size="small", seed=0)
    assert _tree_hash(again) == _tree_hash(Path(toy_mbeir_dir))


def test_other_seed_differs_and_workers_do_not_matter(tmp_path):
    a = make_toy_mbeir(tmp_path / "a", seed=0, preset=TINY)
    b = make_toy_mbeir(tmp_path / "b", seed=0, preset=TINY, workers=2)
    c = make_toy_mbeir(tmp_path / "c", seed=1, preset=TINY)
    assert _tree_hash(a) == _tree_hash(b)
    assert _tree_hash(a) != _tree_hash(c)
    # rebuilding over a previous toy build replaces it cleanly
    make_toy_mbeir(a, seed=0, preset=TINY)
    assert _tree_hash(a) == _tree_hash(b)


def test_independent_of_python_hash_seed(tmp_path):
    """Byte-identical across processes too (no set/dict-of-str iteration order leaks into files)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from umarvel_ray.data.toy.builder import make_toy_mbeir, Preset; "
        "make_toy_mbeir(sys.argv[1], seed=0, preset=Preset(4, 12, 2, 3, 1, 5, 5))"
    )
    hashes = []
    for hs in ("1", "2"):
        out = tmp_path / f"h{hs}"
        env = {**os.environ, "PYTHONHASHSEED": hs}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
        hashes.append(_tree_hash(out))
    assert hashes[0] == hashes[1]
    assert hashes[0] == _tree_hash(make_toy_mbeir(tmp_path / "here", seed=0, preset=TINY))


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_toy_mbeir(tmp_path, preset=TINY)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        make_toy_mbeir(tmp_path / "x", size="huge")
