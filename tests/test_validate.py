"""validate_dir: each planted error is reported at its exact FILE:LINE: field 'NAME', all are collected."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from umarvel_ray.data import catalogue, instructions, mbeir, writers
from umarvel_ray.data.validate import validate_dir, validate_query_file

_JOB = Path(__file__).resolve().parents[1] / "jobs" / "validate_data.py"


def validate_main(argv: list[str]) -> int:
    """Run the real job script's main() in-process (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("validate_data_job", _JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


T0 = catalogue.get_task("mscoco_task0")  # text -> image
T3 = catalogue.get_task("mscoco_task3")  # image -> text


def _q(qid: str, task: int, pos: list[str], txt: str | None = None, img: str | None = None) -> dict:
    mod = {(True, False): "text", (False, True): "image", (True, True): "image,text"}[
        (txt is not None, img is not None)
    ]
    return {
        "qid": qid,
        "query_txt": txt,
        "query_img_path": img,
        "query_modality": mod,
        "query_src_content": None,
        "pos_cand_list": pos,
        "neg_cand_list": [],
        "task_id": task,
    }


def _c(did: str, txt: str | None = None, img: str | None = None) -> dict:
    mod = {(True, False): "text", (False, True): "image", (True, True): "image,text"}[
        (txt is not None, img is not None)
    ]
    return {"did": did, "txt": txt, "img_path": img, "modality": mod, "src_content": None}


def make_dir(root: Path) -> Path:
    """A small valid M-BEIR tree: two MSCOCO tasks, union pool, qrels, instructions, images."""
    imgs = [f"mbeir_images/mscoco_images/{i}.png" for i in range(4)]
    for p in imgs:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b"png")
    pool0 = [_c(f"9:{i}", img=imgs[i]) for i in range(4)]
    pool3 = [_c(f"9:{10 + i}", txt=f"caption {i}") for i in range(4)]
    q0 = [_q(f"9:{i}", 0, [f"9:{i}"], txt=f"caption {i}") for i in range(4)]
    q3 = [_q(f"9:{100 + i}", 3, [f"9:{10 + i}"], img=imgs[i]) for i in range(4)]
    writers.write_pool(root / T0.pool_file, pool0)
    writers.write_pool(root / T3.pool_file, pool3)
    writers.write_pool(root / mbeir.GLOBAL_POOL_FILE, pool0 + pool3)
    writers.write_queries(root / T0.query_file, q0)
    writers.write_queries(root / T3.query_file, q3)
    writers.write_qrels(root / T0.qrels_file, writers.qrels_from_queries(q0))
    writers.write_qrels(root / T3.qrels_file, writers.qrels_from_queries(q3))
    instructions.write_instructions(
        root / mbeir.INSTRUCTIONS_FILE,
        [
            instructions.InstructionRow("text", "image", "MSCOCO", 9, ("a", "b", "c", "d")),
            instructions.InstructionRow("image", "text", "MSCOCO", 9, ("e", "f", "g", "h")),
        ],
    )
    return root


def _set_line(path: Path, line: int, text: str) -> None:
    """Replace 1-based line `line` of a file with raw text (the planted error)."""
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _edit(path: Path, line: int, **changes) -> None:
    rec = json.loads(path.read_text().splitlines()[line - 1])
    for k, v in changes.items():
        if v is ...:
            del rec[k]
        else:
            rec[k] = v
    _set_line(path, line, json.dumps(rec))


def _only(report, prefix: str) -> str:
    """The report must hold exactly one problem, and it must start with FILE:LINE: field 'NAME'."""
    msgs = [str(p) for p in report.problems()]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(prefix), (msgs[0], prefix)
    return msgs[0]


@pytest.fixture
def root(tmp_path):
    return make_dir(tmp_path / "mbeir")


def test_clean_dir_is_ok(root):
    rep = validate_dir(root, check_images=True)
    assert rep.ok, rep.format()
    assert {f.path: f.rows for f in rep.files}[str(root / T0.query_file)] == 4
    kinds = sorted(f.kind for f in rep.files)
    assert kinds == ["instructions", "pool", "pool", "pool", "qrels", "qrels", "queries", "queries"]
    checks = {c.name: c for c in rep.positives}
    assert checks["mscoco_task0"].positives == 4 and checks["mscoco_task0"].missing_local == 0
    assert checks["mscoco_task0"].local_pool == T0.pool_file
    assert checks["mscoco_task0"].union_pool == mbeir.GLOBAL_POOL_FILE
    assert checks["mscoco_task0"].qrels_mismatch == 0


def test_malformed_json(root):
    p = root / T0.query_file
    _set_line(p, 3, '{"qid": "9:2", ')
    _only(validate_dir(root), f"{p}:3: field '<json>': malformed json")


def test_missing_required_field(root):
    p = root / T3.pool_file
    _edit(p, 2, modality=...)
    _only(validate_dir(root), f"{p}:2: field 'modality': missing required field")


def test_unknown_modality(root):
    p = root / T0.query_file
    _edit(p, 4, query_modality="video")
    _only(validate_dir(root), f"{p}:4: field 'query_modality': unknown modality 'video'")


def test_modality_disagrees_with_null_fields(root):
    p = root / T0.pool_file
    _edit(p, 1, img_path=None, txt="now text")  # says image, holds only text
    msg = _only(validate_dir(root), f"{p}:1: field 'modality': modality 'image' disagrees")
    assert "img_path is null/empty" in msg


def test_query_modality_disagrees_with_task(root):
    p = root / T3.query_file
    _edit(p, 2, task_id=0)  # an image query in a text->image task
    _only(validate_dir(root), f"{p}:2: field 'query_modality': 'image' disagrees with task_id 0")


def test_duplicate_id_names_first_line(root):
    p = root / T0.pool_file
    _edit(p, 3, did="9:0")
    _only(validate_dir(root), f"{p}:3: field 'did': duplicate id '9:0' (first at line 1)")


def test_wrong_types(root):
    p = root / T0.query_file
    _edit(p, 1, pos_cand_list="9:0")
    _edit(p, 2, pos_cand_list=[])
    _edit(p, 3, qid=3)
    _edit(p, 4, task_id="0")
    msgs = [str(x) for x in validate_dir(root).problems()]
    assert msgs[0].startswith(f"{p}:1: field 'pos_cand_list': expected a list of ids, got str")
    assert msgs[1].startswith(f"{p}:2: field 'pos_cand_list': empty list")
    assert msgs[2].startswith(f"{p}:3: field 'qid': expected a string id, got int")
    assert msgs[3].startswith(f"{p}:4: field 'task_id': expected an int, got str")
    assert len(msgs) == 4


def test_missing_image_only_when_asked(root):
    p = root / T3.query_file
    (root / "mbeir_images/mscoco_images/2.png").unlink()
    assert validate_dir(root).ok
    rep = validate_dir(root, check_images=True)
    msgs = [str(x) for x in rep.problems()]
    # referenced by the union pool, pool0 (line 3 each) and task3 query line 3; pools come first
    assert msgs == [
        f"{root / mbeir.GLOBAL_POOL_FILE}:3: field 'img_path': image not found: {root}/mbeir_images/mscoco_images/2.png",
        f"{root / T0.pool_file}:3: field 'img_path': image not found: {root}/mbeir_images/mscoco_images/2.png",
        f"{p}:3: field 'query_img_path': image not found: {root}/mbeir_images/mscoco_images/2.png",
    ]


def test_qrels_format_and_task_id(root):
    p = root / T3.qrels_file
    _set_line(p, 2, "9:101 1 9:11 1 3")
    _set_line(p, 4, "9:103 0 9:13 1 0")
    msgs = [str(x) for x in validate_dir(root).problems()]
    assert msgs == [
        f"{p}:2: field 'iter': second field must be 0, got '1'",
        f"{p}:4: field 'task_id': task_id 0 but this file belongs to task 3",
    ]


def test_instructions_errors_and_coverage(root):
    p = root / mbeir.INSTRUCTIONS_FILE
    _set_line(p, 3, "image\ttext\tMSCOCO\tnine\te\tf\tg\th")
    rep = validate_dir(root)
    msgs = [str(x) for x in rep.problems()]
    assert msgs[0] == f"{p}:3: field 'dataset_id': expected an integer, got 'nine'"
    # with that row gone, task3's queries have no instruction: reported at the first such query
    assert msgs[1].startswith(
        f"{root / T3.query_file}:1: field 'query_modality': no instruction for dataset_id=9"
    )
    assert len(msgs) == 2


def test_all_errors_collected_and_capped(root):
    p = root / T0.query_file
    for line in (1, 2, 3, 4):
        _set_line(p, line, "[oops")
    rep = validate_dir(root, keep=2)
    f = next(f for f in rep.files if f.path == str(p))
    assert (f.rows, f.errors, len(f.problems)) == (4, 4, 2)
    text = rep.format(max_errors=1)
    assert f"{p}:1: field '<json>'" in text
    assert f"{p}:2: field '<json>'" not in text
    assert "... and 3 more error(s)" in text
    assert text.endswith("FAILED: 4 error(s)")


def test_missing_positives_counted_not_fatal(root):
    p = root / T0.query_file
    _edit(p, 2, pos_cand_list=["9:1", "9:999"])
    _edit(p, 3, pos_cand_list=["9:998"])
    rep = validate_dir(root)
    assert rep.ok, rep.format()
    c = {c.name: c for c in rep.positives}["mscoco_task0"]
    assert (c.positives, c.missing_local, c.queries_missing_local) == (5, 2, 2)
    assert (c.missing_union, c.queries_missing_union) == (2, 2)
    assert c.qrels_mismatch == 2  # the qrels file still lists the old positives for 9:1 and 9:2
    assert "mscoco_task0: 4 queries, 5 positives, 2 absent from local pool (2 queries)" in rep.format()


def test_positives_checked_against_union_only_when_local_missing(root):
    (root / T0.pool_file).unlink()
    rep = validate_dir(root)
    c = {c.name: c for c in rep.positives}["mscoco_task0"]
    assert c.local_pool is None and c.missing_local == 0
    assert c.union_pool == mbeir.GLOBAL_POOL_FILE and c.missing_union == 0


def test_empty_or_missing_dir(tmp_path):
    rep = validate_dir(tmp_path)
    assert not rep.ok
    assert str(rep.problems()[0]).startswith(f"{tmp_path}:0: field '<dir>': no M-BEIR files")
    assert not validate_dir(tmp_path / "nope").ok


def test_validate_query_file_standalone(tmp_path):
    p = tmp_path / "q.jsonl"
    writers.write_queries(p, [_q("9:1", 0, ["9:1"], txt="x")])
    with open(p, "a") as f:
        f.write(json.dumps({**_q("9:2", 0, ["9:1"], txt="x"), "neg_cand_list": "9:5"}) + "\n")
    rep = validate_query_file(p)
    assert [str(x) for x in rep.problems] == [
        f"{p}:2: field 'neg_cand_list': expected a list of ids, got str"
    ]


def test_job_exit_codes_and_summary(root, capsys):
    assert validate_main([str(root), "--check-images"]) == 0
    out = capsys.readouterr().out
    assert f"{root / T0.query_file}" in out and out.rstrip().endswith("OK")
    assert "mscoco_task3: 4 queries, 4 positives, 0 absent from local pool" in out
    _edit(root / T0.query_file, 1, task_id=99)
    assert validate_main([str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root / T0.query_file}:1: field 'task_id': unknown task_id 99" in out
