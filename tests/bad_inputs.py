"""Small M-BEIR trees that real users' files look like, each breaking one assumption.

The bad-input cases a reviewer handed the project (broken ids, line ends, encodings, images), kept in
the suite so it is self-contained:
`make_cases(OUT_DIR)` writes OUT_DIR/<case>/ M-BEIR trees (needs Pillow).

base/        a valid tree: MSCOCO-style task0 (text -> image) and task3 (image -> text), 3 queries
             each, local pools of 3, the union pool of 6, qrels, instructions.
bom/         base, with the task0 query file saved with a UTF-8 byte-order mark.
cr_only/     base, with the task0 query file using bare CR (old Mac) line ends.
id_newline/  base, with one task0 qid written as "9:1\n" (a trailing newline inside the id string),
             in the query file (its qrels line says 9:1).
quotes_cr/   base, with task0 query texts wrapped in double quotes and containing CR LF, and task3
             candidate texts in lower case without a final period.
Expected behaviour, for every job that reads them (validate, embed, evaluate, mine, teacher,
train): the same rows are read the same way everywhere, or the file is refused with FILE:LINE:
field; never a row that one reader accepts and another silently drops or rejects later.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_base(root: Path, q0_texts: list[str] | None = None, pool3_texts: list[str] | None = None) -> None:
    for d in ("query/test", "cand_pool/local", "cand_pool/global", "qrels/test", "instructions",
              "mbeir_images/mscoco_images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    imgs = []
    for i, rgb in enumerate(COLOURS.values()):
        rel = f"mbeir_images/mscoco_images/{i}.png"
        Image.new("RGB", (64, 48), rgb).save(root / rel)
        imgs.append(rel)
    names = list(COLOURS)
    q0_texts = q0_texts or [f"a {c} square" for c in names]
    pool3_texts = pool3_texts or [f"A {c} square." for c in names]
    pool0 = [{"did": f"9:{i}", "txt": None, "img_path": imgs[i], "modality": "image", "src_content": None}
             for i in range(3)]
    pool3 = [{"did": f"9:{10 + i}", "txt": pool3_texts[i], "img_path": None, "modality": "text",
              "src_content": None} for i in range(3)]
    q0 = [{"qid": f"9:{i}", "query_txt": q0_texts[i], "query_img_path": None, "query_modality": "text",
           "query_src_content": None, "pos_cand_list": [f"9:{i}"], "neg_cand_list": [], "task_id": 0}
          for i in range(3)]
    q3 = [{"qid": f"9:{100 + i}", "query_txt": None, "query_img_path": imgs[i], "query_modality": "image",
           "query_src_content": None, "pos_cand_list": [f"9:{10 + i}"], "neg_cand_list": [], "task_id": 3}
          for i in range(3)]

    def jsonl(rel: str, rows: list[dict]) -> None:
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    jsonl("cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl", pool0)
    jsonl("cand_pool/local/mbeir_mscoco_task3_cand_pool.jsonl", pool3)
    jsonl("cand_pool/global/mbeir_union_test_cand_pool.jsonl", pool0 + pool3)
    jsonl("query/test/mbeir_mscoco_task0_test.jsonl", q0)
    jsonl("query/test/mbeir_mscoco_task3_test.jsonl", q3)
    (root / "qrels/test/mbeir_mscoco_task0_test_qrels.txt").write_text(
        "".join(f"9:{i} 0 9:{i} 1 0\n" for i in range(3)))
    (root / "qrels/test/mbeir_mscoco_task3_test_qrels.txt").write_text(
        "".join(f"9:{100 + i} 0 9:{10 + i} 1 3\n" for i in range(3)))
    (root / "instructions/query_instructions.tsv").write_text(
        "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
        "text\timage\tMSCOCO\t9\tFind a picture for this caption.\t\t\t\n"
        "image\ttext\tMSCOCO\t9\tFind a caption for this picture.\t\t\t\n")


def make_cases(out: Path) -> Path:
    q0 = "query/test/mbeir_mscoco_task0_test.jsonl"
    write_base(out / "base")
    for case in ("bom", "cr_only", "id_newline"):
        write_base(out / case)
    f = out / "bom" / q0
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    f = out / "cr_only" / q0
    f.write_bytes(f.read_bytes().replace(b"\n", b"\r"))
    f = out / "id_newline" / q0
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows[1]["qid"] = "9:1\n"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_base(out / "quotes_cr",
               q0_texts=['"a red square"', "a green\r\nsquare", '"a blue square"'],
               pool3_texts=["a red square", "a green square", "a blue square"])
    return out



CASES = ("base", "bom", "cr_only", "id_newline", "quotes_cr")
Q0 = "query/test/mbeir_mscoco_task0_test.jsonl"
