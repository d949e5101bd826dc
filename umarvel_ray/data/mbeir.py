"""M-BEIR files (queries, candidate pools, qrels, instructions) read into and written from pyarrow.

One module owns the field semantics of RECIPE.md section 2 so that the toy generator, the
validator, the embedding pipeline and the evaluator agree byte for byte: ids are strings
"<dataset_id>:<n>", text or image may be null, `*_src_content` is an opaque string, and every row
keeps its 1-based source `line` so that any later rejection can point back to FILE:LINE.
The per-record checks live here too (`check_query_record`, `check_pool_record`,
`parse_qrels_line`) so the readers and `validate.py` cannot drift apart.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from umarvel_ray.data import jsonl

if TYPE_CHECKING:  # pragma: no cover - typing only
    import ray.data

# ----------------------------------------------------------------------------------------------
# Constants: modalities, datasets, tasks, standard paths
# ----------------------------------------------------------------------------------------------

MODALITIES: tuple[str, ...] = ("text", "image", "image,text")

DATASET_IDS: dict[str, int] = {
    "VisualNews": 0,
    "Fashion200K": 1,
    "WebQA": 2,
    "EDIS": 3,
    "NIGHTS": 4,
    "OVEN": 5,
    "InfoSeek": 6,
    "FashionIQ": 7,
    "CIRR": 8,
    "MSCOCO": 9,
}
DATASET_NAMES: dict[int, str] = {v: k for k, v in DATASET_IDS.items()}

# task_id -> (query modality, candidate modality). Task 5 (image -> image,text) exists in UniIR's
# numbering but has no M-BEIR evaluation task; it is kept so that ids 0..8 all resolve.
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    5: ("image", "image,text"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

GLOBAL_POOL_FILE = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
TRAIN_QUERY_FILE = "query/train/mbeir_union_up_train.jsonl"
TRAIN_POOL_FILE = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"

_SHORT = {"text": "t", "image": "i", "image,text": "(i,t)"}


def task_modalities(task_id: int) -> tuple[str, str]:
    """(query_modality, cand_modality) of an M-BEIR task id; the pool modality is implied by it."""
    try:
        return TASK_MODALITIES[int(task_id)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown M-BEIR task_id {task_id!r} (expected 0..8)") from None


@dataclass(frozen=True)
class TaskSpec:
    """One of the 16 M-BEIR evaluation tasks: where its files are and which k it is scored at."""

    name: str
    dataset: str
    dataset_id: int
    task_id: int
    k: int
    label: str
    query_file: str
    pool_file: str
    qrels_file: str

    @property
    def query_modality(self) -> str:
        return task_modalities(self.task_id)[0]

    @property
    def cand_modality(self) -> str:
        return task_modalities(self.task_id)[1]


def _task(dataset: str, task_id: int) -> TaskSpec:
    low = dataset.lower()
    qm, cm = task_modalities(task_id)
    return TaskSpec(
        name=f"{low}_task{task_id}",
        dataset=dataset,
        dataset_id=DATASET_IDS[dataset],
        task_id=task_id,
        k=10 if dataset in ("Fashion200K", "FashionIQ") else 5,
        label=f"{dataset} {_SHORT[qm]}->{_SHORT[cm]}",
        query_file=f"query/test/mbeir_{low}_task{task_id}_test.jsonl",
        pool_file=f"cand_pool/local/mbeir_{low}_task{task_id}_cand_pool.jsonl",
        qrels_file=f"qrels/test/mbeir_{low}_task{task_id}_test_qrels.txt",
    )


# RECIPE.md column order.
MBEIR_TASKS: list[TaskSpec] = [
    _task("VisualNews", 0),
    _task("MSCOCO", 0),
    _task("Fashion200K", 0),
    _task("WebQA", 1),
    _task("EDIS", 2),
    _task("WebQA", 2),
    _task("VisualNews", 3),
    _task("MSCOCO", 3),
    _task("Fashion200K", 3),
    _task("NIGHTS", 4),
    _task("OVEN", 6),
    _task("InfoSeek", 6),
    _task("FashionIQ", 7),
    _task("CIRR", 7),
    _task("OVEN", 8),
    _task("InfoSeek", 8),
]
TASKS_BY_NAME: dict[str, TaskSpec] = {t.name: t for t in MBEIR_TASKS}


def get_task(name: str) -> TaskSpec:
    """TaskSpec by name ("mscoco_task0"); KeyError lists the valid names."""
    try:
        return TASKS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS_BY_NAME)}") from None


# ----------------------------------------------------------------------------------------------
# Errors and ids
# ----------------------------------------------------------------------------------------------


class MBEIRFormatError(ValueError):
    """A format violation; the message always begins `FILE:LINE: field 'NAME': `."""

    def __init__(self, file: str | Path, line: int, field: str, message: str):
        self.file, self.line, self.field, self.reason = str(file), int(line), field, message
        super().__init__(format_issue(file, line, field, message))


def format_issue(file: str | Path, line: int, field: str, message: str) -> str:
    """The one error-line format shared by readers, validator and pipelines' reject logs."""
    return f"{file}:{line}: field '{field}': {message}"


# Canonical ids only: ASCII digits (`\d` would also take "٣", which int() reads as 3), no
# leading zeros ("9:012" would hash like "9:12"), and matched with fullmatch (`$` also matches
# before a final newline, so "9:1\n" passed a `match(...$)` check and hashed like "9:1").
# With n below the stride, did_to_int / qid_to_int are one-to-one: distinct valid ids never
# share an integer (UniIR's hash_did / hash_qid, src/data/preprocessing/utils.py, same strides).
_ID_RE = re.compile(r"(0|[1-9][0-9]*):(0|[1-9][0-9]*)", re.ASCII)
DID_STRIDE = 10_000_000
QID_STRIDE = 500_000
ID_FORM = "'<dataset_id>:<n>' (ASCII digits, no leading zeros)"


def id_problem(s: Any, stride: int = DID_STRIDE) -> str | None:
    """Why `s` is not a canonical id whose n fits `stride` (None when it is one)."""
    if not isinstance(s, str):
        return f"expected a string id, got {type(s).__name__} {s!r}"
    m = _ID_RE.fullmatch(s)
    if m is None:
        return f"id {s!r} is not of the form {ID_FORM}"
    if int(m.group(2)) >= stride:
        return f"id {s!r}: n={m.group(2)} does not fit the integer id scheme (n < {stride})"
    return None


def split_id(s: str) -> tuple[int, int]:
    """ "9:123" -> (9, 123); ValueError for anything that is not a canonical "<int>:<int>"."""
    m = _ID_RE.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"id {s!r} is not of the form {ID_FORM}")
    return int(m.group(1)), int(m.group(2))


def _to_int(s: str, stride: int) -> int:
    why = id_problem(s, stride)
    if why is not None:
        raise ValueError(why)
    ds, n = split_id(s)
    return ds * stride + n


def did_to_int(did: str) -> int:
    """Candidate id -> faiss int64: dataset_id*10_000_000+n."""
    return _to_int(did, DID_STRIDE)


def qid_to_int(qid: str) -> int:
    """Query id -> int64: dataset_id*500_000+n."""
    return _to_int(qid, QID_STRIDE)


def int_to_did(x: int) -> str:
    """Inverse of did_to_int."""
    x = int(x)
    if x < 0:
        raise ValueError(f"negative candidate int id {x}")
    return f"{x // DID_STRIDE}:{x % DID_STRIDE}"


def int_to_qid(x: int) -> str:
    """Inverse of qid_to_int."""
    x = int(x)
    if x < 0:
        raise ValueError(f"negative query int id {x}")
    return f"{x // QID_STRIDE}:{x % QID_STRIDE}"


# ----------------------------------------------------------------------------------------------
# Text normalisation
# ----------------------------------------------------------------------------------------------


TEXT_RULES = ("uniir", "none")


def normalize_text(s: str | None) -> str:
    """UniIR's `format_string`, applied to query text and candidate text alike.

    Source: TIGER-AI-Lab/UniIR, src/data/preprocessing/utils.py `format_string` (commit 669475c),
    called in src/data/mbeir_dataset.py on `query_txt`, on every candidate `txt` (positives,
    negatives, the pool dataset) and on the instruction-prefixed query. In order: drop every CR
    (so CRLF becomes LF), strip surrounding whitespace, strip surrounding double quotes (all of
    them, as `str.strip('"')` does, with no second whitespace strip), upper-case the first
    character, and add a final "." unless the text ends in ".", "?" or "!". None gives "".
    """
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        if s[-1] not in ".?!":
            s += "."
    return s


def apply_text_rule(txt: Any, rule: str = "uniir") -> str | None:
    """Model text of a record's text field under `rule` (TEXT_RULES); None when there is no text.

    "uniir" is `normalize_text`; "none" passes the text through unchanged. A text that the rule
    empties (only quotes, say) counts as no text, the same test `_present` applies to the raw field.
    """
    if rule not in TEXT_RULES:
        raise ValueError(f"unknown text rule {rule!r} (expected one of {', '.join(TEXT_RULES)})")
    if not _present(txt):
        return None
    out = normalize_text(txt) if rule == "uniir" else txt
    return out if out.strip() else None


# ----------------------------------------------------------------------------------------------
# Record checks (shared by readers and validate.py)
# ----------------------------------------------------------------------------------------------

QUERY_FIELDS = (
    "qid",
    "query_txt",
    "query_img_path",
    "query_modality",
    "query_src_content",
    "pos_cand_list",
    "neg_cand_list",
    "task_id",
)
POOL_FIELDS = ("did", "txt", "img_path", "modality", "src_content")
QUERY_REQUIRED = ("qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "task_id")
POOL_REQUIRED = ("did", "txt", "img_path", "modality")

Issue = tuple[str, str]  # (field, message)


def _present(v: Any) -> bool:
    """A text or image slot counts as filled when it is a non-blank string."""
    return isinstance(v, str) and v.strip() != ""


def _check_id(obj: Mapping[str, Any], name: str, stride: int, out: list[Issue]) -> None:
    why = id_problem(obj[name], stride)
    if why is not None:
        out.append((name, why))


def _check_optional_str(obj: Mapping[str, Any], name: str, out: list[Issue]) -> None:
    v = obj[name]
    if v is not None and not isinstance(v, str):
        out.append((name, f"expected a string or null, got {type(v).__name__}"))


def _check_modality(
    obj: Mapping[str, Any], mod_field: str, txt_field: str, img_field: str, out: list[Issue]
) -> None:
    mod = obj[mod_field]
    if mod not in MODALITIES:
        out.append((mod_field, f"unknown modality {mod!r} (expected one of {', '.join(MODALITIES)})"))
        return
    has_t, has_i = _present(obj[txt_field]), _present(obj[img_field])
    want_t, want_i = "text" in mod, "image" in mod
    if want_t != has_t or want_i != has_i:
        got = ",".join(x for x, h in (("image", has_i), ("text", has_t)) if h) or "nothing"
        out.append(
            (
                mod_field,
                f"modality {mod!r} disagrees with the record: {txt_field} is "
                f"{'set' if has_t else 'null/empty'}, {img_field} is "
                f"{'set' if has_i else 'null/empty'} (looks like {got})",
            )
        )


def _check_id_list(obj: Mapping[str, Any], name: str, nonempty: bool, out: list[Issue]) -> None:
    v = obj[name]
    if not isinstance(v, list):
        out.append((name, f"expected a list of ids, got {type(v).__name__}"))
        return
    if nonempty and not v:
        out.append((name, "empty list (at least one positive is required)"))
    bad = [why for x in v if (why := id_problem(x, DID_STRIDE)) is not None]
    if bad:
        out.append((name, f"{len(bad)} malformed id(s), first: {bad[0]}"))


def check_query_record(obj: Any) -> list[Issue]:
    """All problems of one parsed query line as (field, message); empty when the record is valid."""
    if not isinstance(obj, dict):
        return [("<record>", f"expected a json object, got {type(obj).__name__}")]
    out: list[Issue] = [(f, "missing required field") for f in QUERY_REQUIRED if f not in obj]
    missing = {f for f, _ in out}
    if "qid" not in missing:
        _check_id(obj, "qid", QID_STRIDE, out)
    for f in ("query_txt", "query_img_path"):
        if f not in missing:
            _check_optional_str(obj, f, out)
    if not missing & {"query_modality", "query_txt", "query_img_path"}:
        _check_modality(obj, "query_modality", "query_txt", "query_img_path", out)
    if "pos_cand_list" not in missing:
        _check_id_list(obj, "pos_cand_list", True, out)
    if "neg_cand_list" in obj and obj["neg_cand_list"] is not None:
        _check_id_list(obj, "neg_cand_list", False, out)
    if "task_id" not in missing:
        t = obj["task_id"]
        if not isinstance(t, int) or isinstance(t, bool):
            out.append(("task_id", f"expected an int, got {type(t).__name__} {t!r}"))
        elif t not in TASK_MODALITIES:
            out.append(("task_id", f"unknown task_id {t} (expected 0..8)"))
        elif obj.get("query_modality") in MODALITIES and obj["query_modality"] != TASK_MODALITIES[t][0]:
            qm, cm = TASK_MODALITIES[t]
            out.append(
                (
                    "query_modality",
                    f"{obj['query_modality']!r} disagrees with task_id {t} ({qm} -> {cm})",
                )
            )
    return out


def check_pool_record(obj: Any) -> list[Issue]:
    """All problems of one parsed candidate line as (field, message)."""
    if not isinstance(obj, dict):
        return [("<record>", f"expected a json object, got {type(obj).__name__}")]
    out: list[Issue] = [(f, "missing required field") for f in POOL_REQUIRED if f not in obj]
    missing = {f for f, _ in out}
    if "did" not in missing:
        _check_id(obj, "did", DID_STRIDE, out)
    for f in ("txt", "img_path"):
        if f not in missing:
            _check_optional_str(obj, f, out)
    if not missing & {"modality", "txt", "img_path"}:
        _check_modality(obj, "modality", "txt", "img_path", out)
    return out


def parse_qrels_line(text: str) -> tuple[str, str, int, int] | Issue:
    """`qid 0 did rel task_id` -> (qid, did, rel, task_id), or (field, message) when malformed."""
    parts = text.split()
    if len(parts) != 5:
        return ("<line>", f"expected 5 whitespace-separated fields 'qid 0 did 1 task_id', got {len(parts)}")
    qid, zero, did, rel, task = parts
    if (why := id_problem(qid, QID_STRIDE)) is not None:
        return ("qid", why)
    if zero != "0":
        return ("iter", f"second field must be 0, got {zero!r}")
    if (why := id_problem(did, DID_STRIDE)) is not None:
        return ("did", why)
    if not rel.lstrip("-").isdigit():
        return ("relevance", f"expected an integer, got {rel!r}")
    if not task.isdigit() or int(task) not in TASK_MODALITIES:
        return ("task_id", f"unknown task_id {task!r} (expected 0..8)")
    return qid, did, int(rel), int(task)


# ----------------------------------------------------------------------------------------------
# jsonl reading
# ----------------------------------------------------------------------------------------------


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line_no, obj, json_error) for every non-blank line (the rules of `data.jsonl`)."""
    return jsonl.iter_jsonl(path)


def _opaque(v: Any) -> str | None:
    """src_content is passed through untouched; non-string json is re-serialised to stay a string."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


QUERY_SCHEMA = pa.schema(
    [
        ("qid", pa.string()),
        ("query_txt", pa.string()),
        ("query_img_path", pa.string()),
        ("query_modality", pa.string()),
        ("query_src_content", pa.string()),
        ("pos_cand_list", pa.list_(pa.string())),
        ("neg_cand_list", pa.list_(pa.string())),
        ("task_id", pa.int32()),
        ("line", pa.int32()),
    ]
)
POOL_SCHEMA = pa.schema(
    [
        ("did", pa.string()),
        ("txt", pa.string()),
        ("img_path", pa.string()),
        ("modality", pa.string()),
        ("src_content", pa.string()),
        ("line", pa.int32()),
    ]
)


def _raise_first(path: str | Path, line: int, issues: list[Issue]) -> None:
    if issues:
        f, msg = issues[0]
        raise MBEIRFormatError(path, line, f, msg)


def read_queries(path: str | Path, validate: bool = True) -> pa.Table:
    """Query jsonl -> pa.Table (QUERY_SCHEMA, nulls kept, `line` = 1-based source line).

    With validate=True the first bad record or duplicate qid raises MBEIRFormatError; with False
    records are only coerced (a record that cannot be coerced still raises, with its FILE:LINE).
    """
    cols: dict[str, list[Any]] = {f: [] for f in QUERY_SCHEMA.names}
    seen: dict[str, int] = {}
    for n, obj, err in iter_jsonl(path):
        if err is not None:
            raise MBEIRFormatError(path, n, "<json>", err)
        if validate:
            _raise_first(path, n, check_query_record(obj))
            if obj["qid"] in seen:
                raise MBEIRFormatError(
                    path, n, "qid", f"duplicate id {obj['qid']!r} (first at line {seen[obj['qid']]})"
                )
            seen[obj["qid"]] = n
        try:
            cols["qid"].append(str(obj["qid"]))
            cols["query_txt"].append(obj.get("query_txt"))
            cols["query_img_path"].append(obj.get("query_img_path"))
            cols["query_modality"].append(obj.get("query_modality"))
            cols["query_src_content"].append(_opaque(obj.get("query_src_content")))
            cols["pos_cand_list"].append([str(x) for x in obj.get("pos_cand_list") or []])
            cols["neg_cand_list"].append([str(x) for x in obj.get("neg_cand_list") or []])
            cols["task_id"].append(int(obj["task_id"]))
            cols["line"].append(n)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MBEIRFormatError(path, n, "<record>", f"cannot coerce record: {e!r}") from None
    try:
        return pa.Table.from_pydict(cols, schema=QUERY_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise MBEIRFormatError(path, 0, "<record>", f"cannot build table: {e}") from None


def read_pool(path: str | Path, validate: bool = True) -> pa.Table:
    """Candidate pool jsonl -> pa.Table (POOL_SCHEMA); duplicate dids raise when validate=True."""
    cols: dict[str, list[Any]] = {f: [] for f in POOL_SCHEMA.names}
    seen: dict[str, int] = {}
    for n, obj, err in iter_jsonl(path):
        if err is not None:
            raise MBEIRFormatError(path, n, "<json>", err)
        if validate:
            _raise_first(path, n, check_pool_record(obj))
            if obj["did"] in seen:
                raise MBEIRFormatError(
                    path, n, "did", f"duplicate id {obj['did']!r} (first at line {seen[obj['did']]})"
                )
            seen[obj["did"]] = n
        try:
            cols["did"].append(str(obj["did"]))
            cols["txt"].append(obj.get("txt"))
            cols["img_path"].append(obj.get("img_path"))
            cols["modality"].append(obj.get("modality"))
            cols["src_content"].append(_opaque(obj.get("src_content")))
            cols["line"].append(n)
        except (KeyError, TypeError, AttributeError) as e:
            raise MBEIRFormatError(path, n, "<record>", f"cannot coerce record: {e!r}") from None
    try:
        return pa.Table.from_pydict(cols, schema=POOL_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise MBEIRFormatError(path, 0, "<record>", f"cannot build table: {e}") from None


def read_qrels(path: str | Path) -> dict[str, set[str]]:
    """Qrels text -> {qid: {did, ...}} of lines with relevance > 0; a malformed line raises."""
    out: dict[str, set[str]] = {}
    for n, raw, err in jsonl.iter_text(path):
        if err is not None:
            raise MBEIRFormatError(path, n, "<line>", err)
        parsed = parse_qrels_line(raw)  # type: ignore[arg-type]
        if len(parsed) == 2:
            raise MBEIRFormatError(path, n, parsed[0], parsed[1])  # type: ignore[misc]
        qid, did, rel, _task = parsed  # type: ignore[misc]
        if rel > 0:
            out.setdefault(qid, set()).add(did)
    return out


def _slices(table: pa.Table, blocks: int | None) -> list[pa.Table]:
    n = max(1, blocks or 1)
    step = max(1, -(-table.num_rows // n))
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]


def read_queries_dataset(
    path: str | Path, validate: bool = True, blocks: int | None = None
) -> ray.data.Dataset:
    """Queries as a Ray Dataset (same schema as read_queries), split into `blocks` blocks."""
    import ray.data

    return ray.data.from_arrow(_slices(read_queries(path, validate=validate), blocks))


def read_pool_dataset(path: str | Path, validate: bool = True, blocks: int | None = None) -> ray.data.Dataset:
    """Candidate pool as a Ray Dataset (same schema as read_pool), split into `blocks` blocks."""
    import ray.data

    return ray.data.from_arrow(_slices(read_pool(path, validate=validate), blocks))


# ----------------------------------------------------------------------------------------------
# Instructions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionRow:
    """One tsv row: the prompts for (dataset_id, query modality, candidate modality)."""

    query_modality: str
    cand_modality: str
    dataset: str
    dataset_id: int
    prompts: tuple[str, ...]


@dataclass
class Instructions:
    """Query instructions keyed by (dataset_id, query_modality, cand_modality)."""

    rows: list[InstructionRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_key = {(r.dataset_id, r.query_modality, r.cand_modality): r for r in self.rows}

    def prompts(self, dataset_id: int, query_modality: str, cand_modality: str) -> tuple[str, ...]:
        """All prompts of a key; KeyError names the key when the tsv has no such row."""
        try:
            return self._by_key[(int(dataset_id), query_modality, cand_modality)].prompts
        except KeyError:
            raise KeyError(
                f"no instruction for dataset_id={dataset_id} ({DATASET_NAMES.get(int(dataset_id), '?')}), "
                f"{query_modality} -> {cand_modality}"
            ) from None

    def get(
        self,
        dataset_id: int,
        query_modality: str,
        cand_modality: str,
        rng: random.Random | None = None,
        prompt_index: int | None = None,
    ) -> str:
        """One prompt: `prompt_index` if given, else a draw from `rng`, else prompt 0 (deterministic)."""
        ps = self.prompts(dataset_id, query_modality, cand_modality)
        if prompt_index is not None:
            if not 0 <= prompt_index < len(ps):
                raise IndexError(f"prompt_index {prompt_index} out of range (0..{len(ps) - 1})")
            return ps[prompt_index]
        if rng is not None:
            return ps[rng.randrange(len(ps))]
        return ps[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key


# The jsonl BOM rule for the tsv too: a leading UTF-8 BOM is dropped (csv with newline="" already
# takes LF, CRLF and CR line ends, as `data.jsonl` does).
TSV_ENCODING = "utf-8-sig"

INSTRUCTION_HEADER = (
    "query_modality",
    "cand_modality",
    "dataset",
    "dataset_id",
    "prompt_1",
    "prompt_2",
    "prompt_3",
    "prompt_4",
)


def parse_instruction_row(cells: list[str]) -> InstructionRow | Issue:
    """Cells of one tsv data row -> InstructionRow, or (field, message) when malformed."""
    if len(cells) < 5:
        return ("<line>", f"expected at least 5 tab-separated columns, got {len(cells)}")
    qm, cm, name, ds = (c.strip() for c in cells[:4])
    if qm not in MODALITIES:
        return ("query_modality", f"unknown modality {qm!r} (expected one of {', '.join(MODALITIES)})")
    if cm not in MODALITIES:
        return ("cand_modality", f"unknown modality {cm!r} (expected one of {', '.join(MODALITIES)})")
    if not ds.isdigit():
        return ("dataset_id", f"expected an integer, got {ds!r}")
    prompts = tuple(c.strip() for c in cells[4:] if c.strip())
    if not prompts:
        return ("prompt_1", "no non-empty prompt")
    return InstructionRow(qm, cm, name, int(ds), prompts)


def read_instructions(path: str | Path) -> Instructions:
    """Instruction tsv (header + rows; columns by position, names as in UniIR) -> Instructions."""
    rows: list[InstructionRow] = []
    seen: dict[tuple[int, str, str], int] = {}
    with open(path, encoding=TSV_ENCODING, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["query_modality", "cand_modality"]:
            raise MBEIRFormatError(
                path, 1, "<header>", "expected a header 'query_modality\\tcand_modality\\t...'"
            )
        for cells in reader:
            n = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            parsed = parse_instruction_row(cells)
            if isinstance(parsed, tuple):
                raise MBEIRFormatError(path, n, parsed[0], parsed[1])
            key = (parsed.dataset_id, parsed.query_modality, parsed.cand_modality)
            if key in seen:
                raise MBEIRFormatError(
                    path, n, "dataset_id", f"duplicate row for {key} (first at line {seen[key]})"
                )
            seen[key] = n
            rows.append(parsed)
    return Instructions(rows)


# ----------------------------------------------------------------------------------------------
# Items for the model
# ----------------------------------------------------------------------------------------------


def query_item(
    row: Mapping[str, Any],
    instructions: Instructions,
    rng: random.Random | None = None,
    prompt_index: int | None = None,
    text_rule: str = "uniir",
) -> dict[str, Any]:
    """Query row -> model item {text under `text_rule`, image path, instruction}.

    The instruction is the tsv prompt as written: U-MARVEL keeps it apart from the query text
    (wrapped in its own markers and left out of the pooled span), so UniIR's formatting of the
    concatenated "<prompt> <query>" string has no counterpart here.
    """
    ds, _ = split_id(row["qid"])
    qm = row["query_modality"]
    cm = task_modalities(row["task_id"])[1]
    return {
        "text": apply_text_rule(row.get("query_txt"), text_rule),
        "image": row.get("query_img_path") or None,
        "instruction": instructions.get(ds, qm, cm, rng=rng, prompt_index=prompt_index),
    }


def candidate_item(row: Mapping[str, Any], text_rule: str = "uniir") -> dict[str, Any]:
    """Candidate row -> model item; no instruction, text under the same `text_rule` as queries."""
    return {
        "text": apply_text_rule(row.get("txt"), text_rule),
        "image": row.get("img_path") or None,
        "instruction": None,
    }


# ----------------------------------------------------------------------------------------------
# Writers (toy generator, tests)
# ----------------------------------------------------------------------------------------------


def _rows(rows: Iterable[Mapping[str, Any]] | pa.Table) -> Iterable[Mapping[str, Any]]:
    return rows.to_pylist() if isinstance(rows, pa.Table) else rows


def _write_jsonl(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]] | pa.Table,
    fields: tuple[str, ...],
    defaults: Mapping[str, Any],
    check: Any,
    id_field: str,
) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for n, row in enumerate(_rows(rows), start=1):
            rec = {}
            for k in fields:
                if k in row and row[k] is not None:
                    rec[k] = row[k]
                elif k in defaults:
                    rec[k] = defaults[k]
                elif k in row:
                    rec[k] = None
            _raise_first(path, n, check(rec))
            if rec[id_field] in seen:
                raise MBEIRFormatError(
                    path, n, id_field, f"duplicate id {rec[id_field]!r} (first at line {seen[rec[id_field]]})"
                )
            seen[rec[id_field]] = n
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count = n
    return count


def write_queries(path: str | Path, rows: Iterable[Mapping[str, Any]] | pa.Table) -> int:
    """Write query records (dicts or a read_queries table) as M-BEIR jsonl; validates; returns rows.

    A missing or null `neg_cand_list` is written as [] and a missing `query_src_content` as null,
    the shapes M-BEIR ships; the `line` column of a read table is dropped.
    """
    defaults = {"query_src_content": None, "neg_cand_list": []}
    return _write_jsonl(path, rows, QUERY_FIELDS, defaults, check_query_record, "qid")


def write_pool(path: str | Path, rows: Iterable[Mapping[str, Any]] | pa.Table) -> int:
    """Write candidate records as M-BEIR pool jsonl; validates; returns rows."""
    return _write_jsonl(path, rows, POOL_FIELDS, {"src_content": None}, check_pool_record, "did")


def write_qrels(
    path: str | Path,
    qrels: Mapping[str, Iterable[str]] | Iterable[tuple[str, str, int]],
    task_id: int | None = None,
) -> int:
    """Write `qid 0 did 1 task_id` lines, sorted; either {qid: dids} + task_id or (qid, did, task_id) triples."""
    if isinstance(qrels, Mapping):
        if task_id is None:
            raise ValueError("write_qrels: task_id is required with a {qid: dids} mapping")
        triples = [(q, d, int(task_id)) for q, ds in qrels.items() for d in ds]
    else:
        triples = [(q, d, int(t)) for q, d, t in qrels]
    triples.sort(key=lambda x: (split_id(x[0]), split_id(x[1])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, (q, d, t) in enumerate(triples, start=1):
            line = f"{q} 0 {d} 1 {t}"
            parsed = parse_qrels_line(line)
            if len(parsed) == 2:
                raise MBEIRFormatError(path, n, parsed[0], parsed[1])  # type: ignore[misc]
            f.write(line + "\n")
    return len(triples)


def qrels_from_queries(rows: Iterable[Mapping[str, Any]] | pa.Table) -> list[tuple[str, str, int]]:
    """(qid, did, task_id) for every positive of every query: the qrels M-BEIR ships beside a query file."""
    return [(r["qid"], d, int(r["task_id"])) for r in _rows(rows) for d in r["pos_cand_list"]]


def write_instructions(path: str | Path, rows: Instructions | Iterable[InstructionRow]) -> int:
    """Write the instruction tsv with UniIR's header (prompt_1..prompt_4 columns); returns rows."""
    rows = list(rows.rows if isinstance(rows, Instructions) else rows)
    width = max([4, *(len(r.prompts) for r in rows)])
    header = list(INSTRUCTION_HEADER[:4]) + [f"prompt_{i}" for i in range(1, width + 1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for n, r in enumerate(rows, start=2):
            cells = [r.query_modality, r.cand_modality, r.dataset, str(r.dataset_id), *r.prompts]
            if any(("\t" in c or "\n" in c) for c in cells):
                raise MBEIRFormatError(path, n, "prompt_1", "tabs and newlines are not allowed in tsv cells")
            parsed = parse_instruction_row(cells)
            if isinstance(parsed, tuple):
                raise MBEIRFormatError(path, n, parsed[0], parsed[1])
            f.write("\t".join(cells + [""] * (width - len(r.prompts))) + "\n")
    return len(rows)
