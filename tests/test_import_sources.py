"""jobs/import_data.py on the other two sources users have: a COCO-style caption json and a
Hugging Face `datasets` dataset saved with `save_to_disk`.

Each dataset is built here (PIL images, several captions per image, a caption shared by two
images, non-ASCII text, a missing or broken image, an empty caption). What the import must give
is computed from the source independently of the importer: which captions belong to which source
image, per split. Imported images are matched back to their source files by their bytes, so the
assertions check the copies too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umarvel_ray.data import instructions, mbeir
from umarvel_ray.data.import_config import ImportConfig
from umarvel_ray.data.importer import DEFAULT_PROMPTS, hashed_split, run_import
from umarvel_ray.data.tasks import discover_tasks
from umarvel_ray.data.validate import validate_dir

JOBS = Path(__file__).resolve().parent.parent / "jobs"
SHARED = "A dog runs on the beach."
NON_ASCII = "Ein Hund läuft am Strand — 犬と海"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _image(seed: int, mode: str, size: tuple[int, int] = (36, 44)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    return im.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else im.convert(mode)


def _norm(s: str) -> str:
    return " ".join(s.split())


def _imported(out: Path, split: str, task: int, name: str) -> tuple[list[dict], dict[str, dict]]:
    """(queries, pool records by did) of one imported task and split; qrels must equal the queries'
    positives."""
    from umarvel_ray.data.tasks import task_paths

    qf, pf, rf = task_paths(name, task, split)
    queries = mbeir.read_queries(out / qf).to_pylist()
    pool = {r["did"]: r for r in mbeir.read_pool(out / pf).to_pylist()}
    assert mbeir.read_qrels(out / rf) == {q["qid"]: set(q["pos_cand_list"]) for q in queries}
    for q in queries:
        assert set(q["pos_cand_list"]) <= set(pool), q  # every positive is in the task's pool
    return queries, pool


def _source_of(out: Path, rel: str, sources: dict[str, bytes]) -> str:
    """The source file an imported image is a byte-for-byte copy of."""
    data = (out / rel).read_bytes()
    hits = [k for k, v in sources.items() if v == data]
    assert len(hits) == 1, (rel, hits)
    return hits[0]


def _check_tasks(out: Path, name: str, expected: dict[str, dict[str, set[str]]], sources: dict[str, bytes]) -> None:
    """expected: split -> source image key -> its captions (normalised). Task 0 and task 3 of each
    split must say exactly that, in both directions."""
    for split, img_caps in expected.items():
        want_t0: dict[str, set[str]] = {}
        for key, caps in img_caps.items():
            for c in caps:
                want_t0.setdefault(c, set()).add(key)
        queries, pool = _imported(out, split, 0, name)
        got_t0 = {_norm(q["query_txt"]): {_source_of(out, pool[d]["img_path"], sources) for d in q["pos_cand_list"]}
                  for q in queries}
        assert got_t0 == want_t0, split
        assert len(queries) == len(want_t0)  # one query per distinct caption
        queries, pool = _imported(out, split, 3, name)
        got_t3 = {_source_of(out, q["query_img_path"], sources): {_norm(pool[d]["txt"]) for d in q["pos_cand_list"]}
                  for q in queries}
        assert got_t3 == img_caps, split


# ----------------------------------------------------------------------------------------------
# COCO caption json
# ----------------------------------------------------------------------------------------------


def make_coco(root: Path) -> dict:
    """train2017/-style folder + captions json as COCO ships it (image ids, file names, one
    annotation per caption, captions with stray whitespace)."""
    imgs = root / "train2017"
    imgs.mkdir(parents=True)
    files = {1: ("000000000001.jpg", "RGB"), 2: ("000000000002.png", "RGBA"), 3: ("000000000003.png", "L"),
             4: ("000000000004.png", "P"), 5: ("000000000005.jpg", "RGB"), 6: ("000000000006.jpg", None)}
    for i, (fname, mode) in files.items():
        if mode is not None:  # image 6 is listed but its file is missing
            _image(i, mode).save(imgs / fname)
    anns = [
        (1, SHARED), (1, NON_ASCII), (1, "Sand, waves and a happy dog"),
        (2, "A red kite in the sky "), (2, "Ein Drachen, rot"),
        (3, " A dog runs on the  beach.\n"),  # same caption as image 1 once whitespace is folded
        (6, "A photo whose file is gone"), (6, "Another caption of the missing file"),
        (4, "Un café crème sur la table"), (99, "An annotation of an image id that is not listed"),
        (5, "   "), (5, "Two cats on a sofa"),
    ]
    data = {
        "info": {"description": "user captions"},
        "images": [{"id": i, "file_name": f, "width": 44, "height": 36} for i, (f, _m) in files.items()],
        "annotations": [{"id": 100 + n, "image_id": i, "caption": c} for n, (i, c) in enumerate(anns)],
    }
    path = root / "captions_train2017.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return {"json": path, "images": imgs, "files": files, "anns": anns}


def _coco_seed(test_fraction: float) -> int:
    """A seed whose hashed split puts images 1 and 3 (the shared caption) in test and still leaves
    images in train: the split is a pure function of (seed, image id)."""
    for seed in range(1000):
        s = {i: hashed_split(str(i), seed, test_fraction) for i in (1, 2, 3, 4, 5)}
        if s[1] == s[3] == "test" and "train" in s.values():
            return seed
    raise AssertionError("no seed found")


def test_coco_import(tmp_path, capsys):
    coco = make_coco(tmp_path / "coco")
    seed = _coco_seed(0.5)
    out = tmp_path / "data" / "coco_own"
    rc = _job("import_data").main([f"source={coco['json']}", f"images={coco['images']}", f"out_dir={out}",
                                   "name=cocoown", "dataset_id=22", "test_fraction=0.5", f"seed={seed}"])
    assert rc == 0  # format=auto recognises the COCO json
    report = json.loads((out / "import_report.json").read_text(encoding="utf-8"))
    anns = coco["anns"]
    where = [f"{coco['json']}:annotations[{n}]" for n in range(len(anns))]
    assert report["rejected"] == [
        f"{where[6]}: missing image: {coco['images'] / '000000000006.jpg'}",
        f"{where[7]}: missing image: {coco['images'] / '000000000006.jpg'}",
        f"{where[9]}: image_id 99 is not in the file's 'images'",
        f"{where[10]}: empty caption",
    ]
    assert report["rows_in"] == len(anns) == report["rows_out"] + report["rows_rejected"]
    assert report["rows_out"] == len(anns) - 4
    assert report["validation_errors"] == 0
    printed = capsys.readouterr().out
    assert f"REJECTED {where[9]}: image_id 99" in printed
    assert validate_dir(out, check_images=True).ok
    # One image per item: text->image and image->text only, no image->image task.
    assert [t.name for t in discover_tasks(out)] == ["cocoown_task0", "cocoown_task3"]
    assert not (out / "cand_pool/global").exists() and not (out / "pretrain").exists()

    sources = {f: (coco["images"] / f).read_bytes() for f, m in coco["files"].values() if m is not None}
    expected: dict[str, dict[str, set[str]]] = {"train": {}, "test": {}}
    for n, (i, cap) in enumerate(anns):
        if n in (6, 7, 9, 10):
            continue
        split = hashed_split(str(i), seed, 0.5)
        expected[split].setdefault(coco["files"][i][0], set()).add(_norm(cap))
    assert expected["train"] and expected["test"]
    _check_tasks(out, "cocoown", expected, sources)
    # The shared caption is one test query with both images as positives.
    t0, _ = _imported(out, "test", 0, "cocoown")
    assert [len(q["pos_cand_list"]) for q in t0 if _norm(q["query_txt"]) == SHARED] == [2]
    # Non-ASCII text is kept as written, in the queries, the pools and the report.
    texts = {q["query_txt"] for q in t0}
    assert NON_ASCII in texts
    assert NON_ASCII in (out / "query/test/mbeir_cocoown_task0_test.jsonl").read_text(encoding="utf-8")
    # Ids carry the dataset id; the instruction tsv has one row per written task.
    assert all(q["qid"].startswith("22:") for q in t0)
    instr = instructions.read_instructions(out / mbeir.INSTRUCTIONS_FILE)
    assert instr.prompts(22, "text", "image") == DEFAULT_PROMPTS[0]
    assert instr.prompts(22, "image", "text") == DEFAULT_PROMPTS[3]


def test_coco_missing_image_can_stop_the_import(tmp_path):
    coco = make_coco(tmp_path / "coco")
    with pytest.raises(ValueError, match=r"captions_train2017\.json:annotations\[6\]: field 'image_id': missing image"):
        run_import(ImportConfig(out_dir=str(tmp_path / "o"), source=str(coco["json"]), images=str(coco["images"]),
                                name="cocoown", format="coco", missing_images="error"))


# ----------------------------------------------------------------------------------------------
# Hugging Face `datasets` saved to disk
# ----------------------------------------------------------------------------------------------


def _png(seed: int, mode: str) -> bytes:
    buf = io.BytesIO()
    _image(seed, mode).save(buf, format="PNG")
    return buf.getvalue()


def make_hf(root: Path) -> dict:
    """A DatasetDict(train, test, validation) with an `Image` column, a list-of-captions column and
    an item id column, saved with save_to_disk. Images: PIL images of several modes (datasets encodes
    them), PNG and JPEG bytes, and one that is not an image at all."""
    import datasets

    jpeg = io.BytesIO()
    _image(7, "RGB").save(jpeg, format="JPEG", quality=90)
    parts = {
        "train": [
            (_image(1, "RGB"), ["A yellow tram in the rain", NON_ASCII], "t1"),
            (_image(2, "RGBA"), ["Zwei Fahrräder am Zaun"], "t2"),
            ({"bytes": _png(3, "L"), "path": None}, ["A grey cat asleep"], "t3"),
            ({"bytes": jpeg.getvalue(), "path": None}, ["A bowl of ramen — ラーメン"], "t4"),
        ],
        "test": [
            ({"bytes": _png(11, "P"), "path": None}, [SHARED, "Sand and a dog"], "q1"),
            ({"bytes": _png(12, "RGB"), "path": None}, [SHARED], "q2"),  # shares a caption with q1
            ({"bytes": _png(13, "RGB"), "path": None}, ["The same red chair, front"], "q3"),
            ({"bytes": _png(14, "L"), "path": None}, ["The same red chair, side"], "q3"),  # 2nd image of q3
            ({"bytes": _png(15, "RGB"), "path": None}, [], "q4"),  # no caption
            ({"bytes": b"this is not an image", "path": None}, ["A broken file"], "q5"),
        ],
        "validation": [  # neither train nor test: the hashed split by item
            ({"bytes": _png(21, "RGB"), "path": None}, ["A lighthouse at dusk"], "v1"),
            ({"bytes": _png(22, "RGB"), "path": None}, ["Ein Leuchtturm im Nebel"], "v2"),
        ],
    }
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                                  "item": datasets.Value("string")})
    dd = datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {"image": [r[0] for r in rows], "captions": [r[1] for r in rows], "item": [r[2] for r in rows]},
            features=features,
        )
        for name, rows in parts.items()
    })
    path = root / "hf_saved"
    dd.save_to_disk(str(path))
    # The bytes the dataset holds (PIL images were encoded by datasets): the source of each copy.
    raw = datasets.load_from_disk(str(path))
    sources = {}
    for name in parts:
        d = raw[name].cast_column("image", datasets.Image(decode=False))
        for i, rec in enumerate(d):
            sources[f"{name}[{i}]"] = rec["image"]["bytes"]
    return {"path": path, "parts": parts, "sources": sources}


def test_hf_import(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="umarvel_ray")
    hf = make_hf(tmp_path / "hf")
    out = tmp_path / "data" / "hf_own"
    rc = _job("import_data").main([f"source={hf['path']}", f"out_dir={out}", "name=hfown", "format=hf",
                                   "image_column=image", "caption_column=captions", "id_column=item",
                                   "dataset_id=23", "test_fraction=0.5"])
    assert rc == 0
    report = json.loads((out / "import_report.json").read_text(encoding="utf-8"))
    src = hf["path"]
    assert report["rejected"][0] == f"{src}:test[4]: empty caption"
    assert report["rejected"][1].startswith(f"{src}:test[5]: ")  # the decoder's reason for the bad bytes
    assert len(report["rejected"]) == 2
    n_captions = sum(max(1, len(r[1])) for rows in hf["parts"].values() for r in rows)
    assert report["rows_in"] == n_captions == report["rows_out"] + report["rows_rejected"]
    assert report["validation_errors"] == 0 and validate_dir(out, check_images=True).ok
    assert f"SUMMARY import_data: rows_in={n_captions}, rows_out={n_captions - 2}, rows_rejected=2" in caplog.text
    assert f"REJECTED {src}:test[4]: empty caption" in capsys.readouterr().out
    assert [t.name for t in discover_tasks(out)] == ["hfown_task0", "hfown_task3", "hfown_task4"]

    expected: dict[str, dict[str, set[str]]] = {"train": {}, "test": {}}
    for name, rows in hf["parts"].items():
        for i, (_img, caps, item) in enumerate(rows):
            if (name, i) in (("test", 4), ("test", 5)):
                continue
            split = name if name in ("train", "test") else hashed_split(item, 0, 0.5)
            expected[split].setdefault(f"{name}[{i}]", set()).update(_norm(c) for c in caps)
    _check_tasks(out, "hfown", expected, hf["sources"])
    # Original bytes are copied, with the suffix of their real format.
    t3, _ = _imported(out, "train", 3, "hfown")
    jpgs = [q["query_img_path"] for q in t3 if q["query_img_path"].endswith(".jpg")]
    assert len(jpgs) == 1 and (out / jpgs[0]).read_bytes() == hf["sources"]["train[3]"]
    assert all(p.suffix in (".png", ".jpg") for p in (out / "mbeir_images/hfown").iterdir())
    # Item q3 has two images: image->image, each the other's positive.
    t4, pool4 = _imported(out, "test", 4, "hfown")
    pairs = {_source_of(out, q["query_img_path"], hf["sources"]):
             {_source_of(out, pool4[d]["img_path"], hf["sources"]) for d in q["pos_cand_list"]} for q in t4}
    assert pairs == {"test[2]": {"test[3]"}, "test[3]": {"test[2]"}}
    t0, _ = _imported(out, "test", 0, "hfown")
    assert [len(q["pos_cand_list"]) for q in t0 if q["query_txt"] == SHARED] == [2]


def test_hf_import_names_missing_columns_and_stops_on_a_bad_image(tmp_path):
    from umarvel_ray.config import ConfigError

    hf = make_hf(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"columns \['caption'\] not in the dataset"):
        run_import(ImportConfig(out_dir=str(tmp_path / "a"), source=str(hf["path"]), name="hfown", format="hf"))
    with pytest.raises(ValueError, match=r"hf_saved:test\[5\]: field 'image': "):
        run_import(ImportConfig(out_dir=str(tmp_path / "b"), source=str(hf["path"]), name="hfown", format="hf",
                                caption_column="captions", id_column="item", missing_images="error"))
