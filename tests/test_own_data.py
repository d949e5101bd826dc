"""A user's own data: import -> validate -> train (stage 3, per-task files) -> evaluate -> serve;
discovery.

The dataset is built here the way a user has one (not with the toy generator): PIL images in
RGB, RGBA, palette and grayscale under a folder, a captions csv with non-ASCII captions, two items
sharing a caption, an item with two images, a split column filled for some rows only, and one row
whose image file does not exist.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue, mbeir, model_items
from umarvel_ray.data.import_config import ImportConfig
from umarvel_ray.data.importer import run_import
from umarvel_ray.data.instructions import read_instructions
from umarvel_ray.data.tasks import discover_tasks, merge_pools, resolve_train_inputs
from umarvel_ray.data.validate import validate_dir
from umarvel_ray.eval.plan import EvalConfig, plan_tasks

JOBS = Path(__file__).resolve().parent.parent / "jobs"
NAME = "myphotos"
SHARED = "Ein rotes Fahrrad vor der Bäckerei — 自転車"
TASKS = [f"{NAME}_task0", f"{NAME}_task3", f"{NAME}_task4"]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _lines(p: Path) -> int:
    return sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())


def make_user_dataset(root: Path, n_items: int = 36) -> dict:
    """Images + captions.csv as a user would have them; returns what the test needs to know."""
    photos = root / "photos"
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    things = ["bicycle", "teapot", "café sign", "naïve drawing", "Straße", "猫"]
    rows = []
    for i in range(n_items):
        im = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mode = ["RGB", "RGBA", "P", "L"][i % 4]
        im = im.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else im.convert(mode)
        name = f"set{i % 3}/img_{i:03d}.png"
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(photos / name)
        split = "test" if i < 6 else ("train" if i < 12 else "")  # the rest: hashed by item
        rows.append({"image": name, "caption": f"A {colours[i % 6]} {things[(i // 6) % 6]}, photo {i}",
                     "id": f"item{i}", "split": split})
    rows[0]["caption"] = rows[1]["caption"] = SHARED  # two test items share a caption
    # item2 has a second image (image->image) and item3 a second caption of the same image.
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(photos / "set2/img_002b.png")
    rows.append({"image": "set2/img_002b.png", "caption": "the same thing seen from the left",
                 "id": "item2", "split": "test"})
    rows.append({"image": rows[3]["image"], "caption": "zweite Beschreibung, ça marche", "id": "item3",
                 "split": "test"})
    rows.append({"image": "set1/not_there.png", "caption": "an image that is missing", "id": "gone",
                 "split": "test"})
    path = root / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "id", "split"])
        w.writeheader()
        w.writerows(rows)
    return {"csv": path, "photos": photos, "rows": len(rows), "missing_line": len(rows) + 1}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_data")
    info = make_user_dataset(tmp / "user")
    out = tmp / "imported"
    res = run_import(
        ImportConfig(out_dir=str(out), source=str(info["csv"]), images=str(info["photos"]), name=NAME,
                     dataset_id=21, test_fraction=0.3)
    )
    return {**info, "out": out, "res": res, "tmp": tmp}


def test_import_writes_a_valid_layout_and_accounts_for_every_row(user):
    res, out = user["res"], user["out"]
    # Every row is written or rejected, the missing image with its FILE:LINE.
    assert res.rows_in == user["rows"] == res.rows_out + res.rows_rejected
    assert res.rejected == [f"{user['csv']}:{user['missing_line']}: missing image: "
                            f"{user['photos'] / 'set1/not_there.png'}"]
    report = json.loads((out / "import_report.json").read_text(encoding="utf-8"))
    assert report["rows_in"] == report["rows_out"] + report["rows_rejected"]
    rep = validate_dir(out, check_images=True)
    assert rep.ok, rep.format()
    # No union files, no pretrain folder: only what the layout needs.
    assert not (out / "cand_pool/global").exists() and not (out / "pretrain").exists()
    assert [t.name for t in discover_tasks(out)] == TASKS
    t0 = mbeir.read_queries(out / f"query/test/mbeir_{NAME}_task0_test.jsonl").to_pylist()
    shared = [q for q in t0 if q["query_txt"] == SHARED]
    assert len(shared) == 1 and len(shared[0]["pos_cand_list"]) == 2  # several positives
    pool3 = {r["txt"] for r in mbeir.read_pool(out / f"cand_pool/local/mbeir_{NAME}_task3_cand_pool.jsonl").to_pylist()}
    assert "zweite Beschreibung, ça marche" in pool3  # non-ASCII kept as written
    t4 = mbeir.read_queries(out / f"query/test/mbeir_{NAME}_task4_test.jsonl").to_pylist()
    assert len(t4) == 2 and all(len(q["pos_cand_list"]) == 1 for q in t4)  # item2's two images
    # RGBA / palette / grayscale images were all kept (only the missing one was rejected).
    test_imgs = _lines(out / f"cand_pool/local/mbeir_{NAME}_task0_cand_pool.jsonl")
    train_imgs = _lines(out / f"cand_pool/local/mbeir_{NAME}_task0_train_cand_pool.jsonl")
    assert test_imgs + train_imgs == 36 + 1
    # Splits are by item and deterministic: a second import gives the same bytes.
    again = user["tmp"] / "again"
    run_import(ImportConfig(out_dir=str(again), source=str(user["csv"]), images=str(user["photos"]),
                            name=NAME, dataset_id=21, test_fraction=0.3))
    for p in out.rglob("*.jsonl"):
        assert (again / p.relative_to(out)).read_bytes() == p.read_bytes(), p


def test_import_missing_image_can_stop_the_import(user, tmp_path):
    with pytest.raises(mbeir.MBEIRFormatError, match=rf"captions.csv:{user['missing_line']}: field 'image'"):
        run_import(ImportConfig(out_dir=str(tmp_path / "o"), source=str(user["csv"]), images=str(user["photos"]),
                                name=NAME, missing_images="error"))


def _mixed_root(user, toy_mbeir_dir, dst: Path) -> Path:
    """The imported tasks next to the toy's mscoco_task0, without any union file."""
    shutil.copytree(user["out"], dst)
    spec = catalogue.TASKS_BY_NAME["mscoco_task0"]
    for rel in (spec.query_file, spec.pool_file, spec.qrels_file):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(toy_mbeir_dir) / rel, dst / rel)
    tsv = (Path(toy_mbeir_dir) / mbeir.INSTRUCTIONS_FILE).read_text().splitlines()
    mine = (dst / mbeir.INSTRUCTIONS_FILE).read_text().splitlines()
    (dst / mbeir.INSTRUCTIONS_FILE).write_text("\n".join(mine + [r for r in tsv[1:] if "\t9\t" in r]) + "\n")
    return dst


def test_custom_tasks_next_to_a_known_one_and_no_union_pool(user, toy_mbeir_dir, tmp_path):
    root = _mixed_root(user, toy_mbeir_dir, tmp_path / "mixed")
    assert validate_dir(root).ok
    found = discover_tasks(root, k={f"{NAME}_task4": 10})
    assert [t.name for t in found] == ["mscoco_task0", *TASKS]  # known first, then by name
    assert found[0] is catalogue.TASKS_BY_NAME["mscoco_task0"]
    assert [t.k for t in found] == [5, 5, 5, 10] and found[1].label == f"{NAME} t->i"
    with pytest.raises(ValueError, match="published metric"):
        discover_tasks(root, k={"mscoco_task0": 10})
    cfg = EvalConfig(data_root=str(root), model="unused", out_dir=str(tmp_path / "eval"),
                     task_k={f"{NAME}_task4": 10})
    plan = plan_tasks(cfg)
    assert [t.name for t in plan.tasks] == ["mscoco_task0", *TASKS]
    assert [t.name for t in plan.expected] == [t.name for t in catalogue.MBEIR_TASKS] + TASKS
    assert plan.depth == 10 and "mbeir_union" not in str(plan.global_pool_file)
    # Global pool = union of the 4 local pools, ids deduplicated (task0 and task4 share images).
    local_ids = set()
    for t in plan.tasks:
        local_ids |= set(mbeir.read_pool(root / t.pool_file).column("did").to_pylist())
    glob = mbeir.read_pool(plan.global_pool_file).column("did").to_pylist()
    assert len(glob) == len(set(glob)) == len(local_ids) and set(glob) == local_ids
    with pytest.raises(ConfigError, match="unknown task"):
        plan_tasks(EvalConfig(data_root=str(root), model="unused", out_dir=str(tmp_path / "e2"), tasks=["x_task0"]))


def test_conflicting_pool_records_are_refused_with_file_and_line(user, tmp_path):
    a = user["out"] / f"cand_pool/local/mbeir_{NAME}_task0_cand_pool.jsonl"
    rows = a.read_text(encoding="utf-8").splitlines()
    rec = json.loads(rows[1])
    rec["img_path"] = "mbeir_images/other.png"
    b = tmp_path / "b.jsonl"
    b.write_text(rows[0] + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(mbeir.MBEIRFormatError, match=rf"b.jsonl:2: field 'did': id '{rec['did']}' is also at .*task0_cand_pool.jsonl:2"):
        merge_pools([a, b], tmp_path / "u.jsonl")
    assert merge_pools([a, a], tmp_path / "same.jsonl") == len(rows)  # same record twice: one row


def test_training_inputs_without_union_files(user, tmp_path):
    out = user["out"]
    queries, pool, how = resolve_train_inputs(
        out, out / mbeir.TRAIN_QUERY_FILE, out / mbeir.TRAIN_POOL_FILE, tmp_path / "cache"
    )
    assert how == "per-task" and [q.name for q in queries] == [
        f"mbeir_{NAME}_task0_train.jsonl", f"mbeir_{NAME}_task3_train.jsonl"]
    dids = set(mbeir.read_pool(pool).column("did").to_pylist())
    for q in queries:
        for r in mbeir.read_queries(q).to_pylist():
            assert set(r["pos_cand_list"]) <= dids  # every train positive is in the merged pool
    # Only the union files may be absent: a path the user set that is not there is an error.
    with pytest.raises(FileNotFoundError, match="input file not found"):
        resolve_train_inputs(out, out / "query/train/mine.jsonl", out / mbeir.TRAIN_POOL_FILE, tmp_path / "c2")


def test_stage1_without_pretrain_pairs_stops_before_any_work(user, monkeypatch, caplog):
    import umarvel_ray.runtime

    def no_ray(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("Ray started although stage 1 cannot run")

    monkeypatch.setattr(umarvel_ray.runtime, "ensure_ray", no_ray)
    job = _job("train")
    rc = job.main([f"data_root={user['out']}", f"run_dir={user['tmp'] / 'run-s1'}",
                   "model=Qwen/Qwen2-VL-7B-Instruct"])
    assert rc == 2
    text = caplog.text
    assert "pretrain/nli_pairs.jsonl" in text and '"sent0"' in text and "stages=[stage3,stage4,stage5]" in text
    rc = job.main([f"data_root={user['out']}", f"run_dir={user['tmp'] / 'run-s2'}",
                   "model=Qwen/Qwen2-VL-7B-Instruct", "stages=[stage2,stage3]"])
    assert rc == 2 and "pretrain/caption_pairs.jsonl" in caplog.text and '"img_path"' in caplog.text



def test_stages_4_5_without_their_mined_files_stop_before_any_work(user, monkeypatch, caplog):
    """jobs/train.py 'stages=[stage3,stage4,stage5]' cannot work alone: stage 4 trains on negatives
    mined with the stage-3 model and stage 5 on teacher scores, which other jobs write. It says so
    before stage 3 starts (it used to train stage 3, then fail inside stage 4's workers)."""
    import umarvel_ray.runtime

    def no_ray(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("Ray started although stage 4 cannot run")

    monkeypatch.setattr(umarvel_ray.runtime, "ensure_ray", no_ray)
    job = _job("train")
    run = user["tmp"] / "run-s345"
    base = [f"data_root={user['out']}", f"run_dir={run}", "model=Qwen/Qwen2-VL-7B-Instruct"]
    assert job.main([*base, "stages=[stage3,stage4,stage5]"]) == 2
    assert f"{run}/negatives/negatives.jsonl" in caplog.text and "jobs/mine_negatives.py" in caplog.text
    assert "jobs/recipe.py" in caplog.text
    caplog.clear()
    assert job.main([*base, "stages=[stage3,stage5]"]) == 2
    assert f"{run}/teacher/teacher.jsonl" in caplog.text and "jobs/teacher_scores.py" in caplog.text
    # Once the files are there, the check passes (it reaches Ray, which this test forbids).
    for rel in ("negatives/negatives.jsonl", "teacher/teacher.jsonl"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("")
    caplog.clear()
    assert job.main([*base, "stages=[stage3,stage4,stage5]"]) == 1
    assert "Ray started although" in caplog.text and "does not exist yet" not in caplog.text


@pytest.mark.ray
def test_import_validate_train_stage3_evaluate(user, ray_cluster, tiny_model_dir, tmp_path, capsys):
    from umarvel_ray.train.config import TrainConfig
    from umarvel_ray.train.launch import run_stage

    out = user["out"]
    cfg = TrainConfig(stage="stage3", run_dir=str(tmp_path / "run"), model=str(tiny_model_dir),
                      data_kind="mbeir", data_root=str(out), train_file=str(out / mbeir.TRAIN_QUERY_FILE),
                      pool_file=str(out / mbeir.TRAIN_POOL_FILE),
                      instructions_file=str(out / mbeir.INSTRUCTIONS_FILE), lora_r=4, lora_alpha=8, lr=1e-3,
                      per_device_batch=4, max_steps=3, save_every=3, log_every=1, workers=1,
                      cpus_per_worker=0.5, max_failures=0, upsample_min=30)
    model = run_stage(cfg)
    assert (model / "config.json").is_file()
    job = _job("evaluate")
    ev = tmp_path / "eval"
    argv = [f"data_root={out}", f"model={model}", f"out_dir={ev}", "embed.batch_size=32",
            "embed.actor_num_cpus=0.5", "embed.decode_num_cpus=0.25", "embed.use_gpu=false", "index_device=cpu",
            f"task_k={{{NAME}_task4: 1}}"]
    assert job.main(argv) == 0
    data = json.loads((ev / "mbeir.json").read_text())
    assert data["order"] == TASKS
    for name in TASKS:
        spec = next(t for t in discover_tasks(out) if t.name == name)
        n_file = _lines(out / spec.query_file)
        assert data["tasks"][name]["metric"] == ("R@1" if name.endswith("task4") else "R@5")
        for pool in ("local", "global"):
            m = data["tasks"][name][pool]
            assert m["n_queries"] == n_file and 0.0 <= m["hit"] <= 1.0
    assert data["averages"]["local"]["tasks"] == TASKS
    md = (ev / "mbeir.md").read_text()
    assert f"| {NAME} t->i | R@5 |" in md and f"avg of 3: {', '.join(TASKS)}" in md
    assert data["settings"]["global_pool_from_local_pools"]
    _serve_the_evaluation(out, model, ev)


def _serve_the_evaluation(out: Path, model: Path, ev: Path) -> None:
    """README "Your own data" step 4: the app built on the evaluation's global index and pool
    embeddings answers /v1/search for a known caption with the ranking the evaluation scored,
    its image among the results."""
    import requests
    from serve_fixtures import serve_app, small_args

    from umarvel_ray.embed.decode import query_rng
    from umarvel_ray.eval.report import read_trec_run, run_path

    index_dir, emb_dir = ev / "index" / "global", ev / "embeddings" / "pool-global"
    # Without a union file the global pool is the merged local pools the evaluation wrote.
    manifest = json.loads((emb_dir / "manifest.json").read_text())
    union = ev / "inputs" / "union_test_cand_pool.jsonl"
    assert manifest["input"] == str(union) and manifest["settings"]["data_root"] == str(out)
    assert (ev / "index" / "global.meta.json").is_file()
    pool = {r["did"]: r for r in mbeir.read_pool(union).to_pylist()}
    task0 = next(t for t in discover_tasks(out) if t.name == f"{NAME}_task0")
    run = read_trec_run(run_path(ev, task0.name, "global"))
    queries = mbeir.read_queries(out / task0.query_file).to_pylist()
    k = len(next(iter(run.values())))
    assert k < len(pool)  # the top-k is a real cut of the pool
    # A caption whose image the evaluation ranked in its top k (R@5 > 0 for this task).
    hits = [q for q in queries if set(q["pos_cand_list"]) & {d for d, _ in run[q["qid"]]}]
    assert hits, "no text->image hit in the global run: nothing to check the server against"
    q = hits[0]
    instructions = read_instructions(out / mbeir.INSTRUCTIONS_FILE)
    # The instruction the evaluation drew for this query (instruction=random, seed 0).
    item = model_items.query_item(q, instructions, rng=query_rng(0, q["qid"]))
    args = small_args(model, {"index_dir": index_dir, "embeddings_dir": emb_dir}, reranker_dir="")
    with serve_app(args, name="own_data") as base:
        r = requests.post(f"{base}/v1/search", timeout=120,
                          json={"query": {"text": q["query_txt"], "instruction": item["instruction"]}, "k": k})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    served = [(x["id"], x["score"]) for x in results]
    want = run[q["qid"]]
    # The ranking the evaluation scored: same ids with the same scores (order up to float ties).
    assert sorted(d for d, _ in served) == sorted(d for d, _ in want)
    np.testing.assert_allclose([s for _, s in served], [s for _, s in want], atol=1e-4)
    np.testing.assert_allclose([dict(served)[d] for d, _ in want], [s for _, s in want], atol=1e-4)
    image = (set(q["pos_cand_list"]) & {d for d, _ in served}).pop()
    rec = next(x["record"] for x in results if x["id"] == image)
    assert rec["modality"] == "image" and rec["image_url"].endswith(f"/v1/records/{image}/image")
    assert pool[image]["img_path"].startswith(f"mbeir_images/{NAME}/")
