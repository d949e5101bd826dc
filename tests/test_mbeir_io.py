"""M-BEIR formats: round trips keep nulls and string ids, tasks/ids/instructions behave as RECIPE says."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from umarvel_ray.data import catalogue, instructions, mbeir, writers
from umarvel_ray.data.catalogue import MBEIR_TASKS, task_modalities
from umarvel_ray.data.instructions import InstructionRow, Instructions, read_instructions, write_instructions
from umarvel_ray.data.mbeir import (
    MBEIRFormatError,
    did_to_int,
    int_to_did,
    int_to_qid,
    qid_to_int,
    read_pool,
    read_qrels,
    read_queries,
)
from umarvel_ray.data.model_items import candidate_item, normalize_text, query_item
from umarvel_ray.data.writers import write_pool, write_qrels, write_queries

QUERIES = [
    {
        "qid": "9:1",
        "query_txt": "a dog on a skateboard",
        "query_img_path": None,
        "query_modality": "text",
        "query_src_content": '{"id": "391895", "extra": [1, 2]}',
        "pos_cand_list": ["9:10", "9:11"],
        "neg_cand_list": [],
        "task_id": 0,
    },
    {
        "qid": "9:2",
        "query_txt": None,
        "query_img_path": "mbeir_images/mscoco_images/val2014/x.jpg",
        "query_modality": "image",
        "query_src_content": None,
        "pos_cand_list": ["9:12"],
        "neg_cand_list": ["9:13"],
        "task_id": 3,
    },
    {
        "qid": "8:7",
        "query_txt": "make it red — ünïcode",
        "query_img_path": "mbeir_images/cirr_images/a.png",
        "query_modality": "image,text",
        "query_src_content": "",
        "pos_cand_list": ["8:1"],
        "neg_cand_list": [],
        "task_id": 7,
    },
]
POOL = [
    {"did": "9:10", "txt": None, "img_path": "mbeir_images/a.jpg", "modality": "image", "src_content": None},
    {"did": "9:11", "txt": "A caption.", "img_path": None, "modality": "text", "src_content": '{"k": 1}'},
    {
        "did": "2:5",
        "txt": "both",
        "img_path": "mbeir_images/b.jpg",
        "modality": "image,text",
        "src_content": "",
    },
]
PROMPTS = (
    "Retrieve a matching image",
    "Find an image for this caption:",
    "Show me a picture?",
    "Image please!",
)
INSTR = [
    InstructionRow("text", "image", "MSCOCO", 9, PROMPTS),
    InstructionRow("image", "text", "MSCOCO", 9, ("p1.", "p2.", "p3.", "p4.")),
    InstructionRow("image,text", "image", "CIRR", 8, ("c1", "c2", "c3", "c4")),
]


def test_query_round_trip_keeps_nulls_and_string_ids(tmp_path):
    p = tmp_path / "q.jsonl"
    assert write_queries(p, QUERIES) == 3
    t = read_queries(p)
    assert t.schema == mbeir.QUERY_SCHEMA
    rows = t.to_pylist()
    assert [r.pop("line") for r in rows] == [1, 2, 3]
    assert rows == QUERIES
    assert t.column("query_txt").null_count == 1 and t.column("query_img_path").null_count == 1
    # writing the read table back gives identical bytes (the `line` column is dropped)
    p2 = tmp_path / "q2.jsonl"
    write_queries(p2, t)
    assert p2.read_text() == p.read_text()
    assert read_queries(p2).equals(t)


def test_pool_round_trip_and_src_content_stays_opaque_string(tmp_path):
    p = tmp_path / "pool.jsonl"
    write_pool(p, POOL)
    rows = read_pool(p).to_pylist()
    assert [r.pop("line") for r in rows] == [1, 2, 3]
    assert rows == POOL
    # a json object in src_content (seen in some dumps) is kept as a json string, never parsed away
    p.write_text(json.dumps({**POOL[0], "src_content": {"a": [1, None]}}) + "\n")
    assert read_pool(p).column("src_content").to_pylist() == ['{"a": [1, null]}']


def test_line_column_counts_blank_lines(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text("\n" + json.dumps(POOL[0]) + "\n\n" + json.dumps(POOL[1]) + "\n")
    assert read_pool(p).column("line").to_pylist() == [2, 4]


def test_writer_defaults_and_rejects_bad_records(tmp_path):
    p = tmp_path / "q.jsonl"
    minimal = {k: v for k, v in QUERIES[0].items() if k not in ("neg_cand_list", "query_src_content")}
    write_queries(p, [minimal])
    rec = json.loads(p.read_text())
    assert rec["neg_cand_list"] == [] and rec["query_src_content"] is None
    assert list(rec) == list(mbeir.QUERY_FIELDS)
    with pytest.raises(
        MBEIRFormatError, match=r"q\.jsonl:2: field 'qid': duplicate id '9:1' \(first at line 1\)"
    ):
        write_queries(p, [QUERIES[0], QUERIES[0]])
    with pytest.raises(MBEIRFormatError, match=r"q\.jsonl:1: field 'qid': expected a string id"):
        write_queries(p, [{**QUERIES[0], "qid": 91}])


def test_reader_raises_file_line_field(tmp_path):
    p = tmp_path / "q.jsonl"
    bad = {**QUERIES[1], "query_modality": "text"}  # text modality but only an image
    p.write_text(json.dumps(QUERIES[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(MBEIRFormatError) as ei:
        read_queries(p)
    assert str(ei.value).startswith(f"{p}:2: field 'query_modality': ")
    assert (ei.value.line, ei.value.field) == (2, "query_modality")
    p.write_text(json.dumps(QUERIES[0]) + "\n{not json\n")
    with pytest.raises(MBEIRFormatError, match=r":2: field '<json>': malformed json"):
        read_queries(p, validate=False)


def test_qrels_round_trip(tmp_path):
    p = tmp_path / "qrels.txt"
    n = write_qrels(p, writers.qrels_from_queries(QUERIES))
    assert n == 4
    assert p.read_text().splitlines() == [
        "8:7 0 8:1 1 7",
        "9:1 0 9:10 1 0",
        "9:1 0 9:11 1 0",
        "9:2 0 9:12 1 3",
    ]
    assert read_qrels(p) == {"9:1": {"9:10", "9:11"}, "9:2": {"9:12"}, "8:7": {"8:1"}}
    write_qrels(p, {"9:1": ["9:10"]}, task_id=0)
    assert p.read_text() == "9:1 0 9:10 1 0\n"
    p.write_text("9:1 0 9:10 1 0\n9:1 0 9:10\n")
    with pytest.raises(MBEIRFormatError, match=r"qrels\.txt:2: field '<line>'"):
        read_qrels(p)


def test_instructions_round_trip_and_real_header(tmp_path):
    p = tmp_path / "instructions" / "query_instructions.tsv"
    write_instructions(p, INSTR)
    header = p.read_text().splitlines()[0].split("\t")
    assert header == list(instructions.INSTRUCTION_HEADER)
    assert read_instructions(p).rows == INSTR
    # the published file's name column may be called differently; columns are positional
    p.write_text(
        "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
        'text\timage\tVisualNews\t0\tIdentify the "news" image.\tb\tc\td\n'
    )
    ins = read_instructions(p)
    assert ins.get(0, "text", "image", prompt_index=0) == 'Identify the "news" image.'
    p.write_text("query_modality\tcand_modality\tdataset\tdataset_id\tp1\ntext\tvideo\tX\t0\tq\n")
    with pytest.raises(MBEIRFormatError, match=r"query_instructions\.tsv:2: field 'cand_modality'"):
        read_instructions(p)


def test_instruction_sampling_deterministic_per_seed_and_varies_across_seeds():
    ins = Instructions(INSTR)

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [ins.get(9, "text", "image", rng=rng) for _ in range(200)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert set(draws(3)) == set(PROMPTS)  # every prompt is reachable
    counts = [draws(4).count(p) for p in PROMPTS]
    assert min(counts) > 25  # roughly uniform over 4 prompts (expected 50 each)


def test_fixed_prompt_index_and_missing_key():
    ins = Instructions(INSTR)
    rng = random.Random(0)
    assert [ins.get(9, "text", "image", rng=rng, prompt_index=2) for _ in range(10)] == [PROMPTS[2]] * 10
    assert ins.get(9, "text", "image") == PROMPTS[0]
    with pytest.raises(IndexError):
        ins.get(9, "text", "image", prompt_index=4)
    with pytest.raises(KeyError, match="dataset_id=9"):
        ins.get(9, "text", "text")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("  a dog on a skateboard  ", "A dog on a skateboard."),
        ("what is this?", "What is this?"),
        ("Wow!", "Wow!"),
        ("ends with period.", "Ends with period."),
        ("", ""),
        ("   ", ""),
        ("1990 photo", "1990 photo."),
        ("éclair", "Éclair."),
        ("Find it:", "Find it:."),
    ],
)
def test_normalize_text(raw, want):
    assert normalize_text(raw) == want


def test_query_and_candidate_items():
    ins = Instructions(INSTR)
    item = query_item(QUERIES[0], ins, prompt_index=1)
    assert item == {"text": "A dog on a skateboard.", "image": None, "instruction": PROMPTS[1]}
    item = query_item(QUERIES[1], ins, rng=random.Random(0))
    assert item["text"] is None and item["image"] == QUERIES[1]["query_img_path"]
    assert item["instruction"] in ("p1.", "p2.", "p3.", "p4.")
    # candidate modality comes from task_id (7: image,text -> image)
    assert query_item(QUERIES[2], ins, prompt_index=3)["instruction"] == "c4"
    assert candidate_item(POOL[0]) == {"text": None, "image": "mbeir_images/a.jpg", "instruction": None}
    assert candidate_item(POOL[1]) == {"text": "A caption.", "image": None, "instruction": None}


def test_id_hashing_round_trip_and_limits():
    for s in ["0:0", "9:123", "5:9999999", "7:42"]:
        assert int_to_did(did_to_int(s)) == s
    for s in ["0:0", "9:123", "6:499999"]:
        assert int_to_qid(qid_to_int(s)) == s
    assert did_to_int("9:123") == 90_000_123
    assert qid_to_int("9:123") == 4_500_123
    with pytest.raises(ValueError, match="does not fit"):
        qid_to_int("1:500000")
    with pytest.raises(ValueError, match="does not fit"):
        did_to_int("1:10000000")
    with pytest.raises(ValueError):
        did_to_int("9-123")


def test_tasks_table_matches_recipe():
    assert len(MBEIR_TASKS) == 16
    assert len({t.name for t in MBEIR_TASKS}) == 16
    assert [t.label for t in MBEIR_TASKS][:4] == [
        "VisualNews t->i",
        "MSCOCO t->i",
        "Fashion200K t->i",
        "WebQA t->t",
    ]
    assert {t.name for t in MBEIR_TASKS if t.k == 10} == {
        "fashion200k_task0",
        "fashion200k_task3",
        "fashioniq_task7",
    }
    t = catalogue.get_task("mscoco_task0")
    assert (t.dataset, t.dataset_id, t.task_id, t.k) == ("MSCOCO", 9, 0, 5)
    assert t.query_file == "query/test/mbeir_mscoco_task0_test.jsonl"
    assert t.pool_file == "cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl"
    assert t.qrels_file == "qrels/test/mbeir_mscoco_task0_test_qrels.txt"
    assert (t.query_modality, t.cand_modality) == ("text", "image")
    assert catalogue.get_task("infoseek_task8").label == "InfoSeek (i,t)->(i,t)"
    assert task_modalities(2) == ("text", "image,text")
    assert task_modalities(6) == ("image,text", "text")
    with pytest.raises(ValueError):
        task_modalities(9)


@pytest.mark.ray
def test_ray_datasets_have_reader_schema(tmp_path, ray_cluster):
    p = tmp_path / "q.jsonl"
    write_queries(p, QUERIES)
    ds = mbeir.read_queries_dataset(p, blocks=2)
    assert ds.count() == 3
    got = pa.concat_tables(ray_cluster.get(ds.to_arrow_refs()))
    assert got.schema == mbeir.QUERY_SCHEMA
    assert got.sort_by("line").equals(read_queries(p))
