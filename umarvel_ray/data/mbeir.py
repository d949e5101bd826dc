"""M-BEIR files (queries, candidate pools, qrels) read into pyarrow; ids and per-record checks.

One module owns the field semantics of the M-BEIR format (UniIR's jsonl records) so that the toy
generator, the validator, the embedding pipeline and the evaluator agree byte for byte: ids are
strings "<dataset_id>:<n>", text or image may be null, `*_src_content` is an opaque string, and
every row keeps its 1-based source `line` so that any later rejection can point back to FILE:LINE.
The per-record checks live here too (`check_query_record`, `check_pool_record`,
`parse_qrels_line`) so the readers, the writers (`data.writers`) and `validate.py` cannot drift
apart. The benchmark's datasets and tasks are `data.catalogue`, the instruction tsv is
`data.instructions`, and what the model is given for a record is `data.model_items`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from umarvel_ray.data import jsonl
from umarvel_ray.data.catalogue import TASK_MODALITIES

if TYPE_CHECKING:  # pragma: no cover - typing only
    import ray.data

# ----------------------------------------------------------------------------------------------
# Constants: modalities, standard paths
# ----------------------------------------------------------------------------------------------

MODALITIES: tuple[str, ...] = ("text", "image", "image,text")

GLOBAL_POOL_FILE = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
TRAIN_QUERY_FILE = "query/train/mbeir_union_up_train.jsonl"
TRAIN_POOL_FILE = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"

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


def present(v: Any) -> bool:
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
    has_t, has_i = present(obj[txt_field]), present(obj[img_field])
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


def raise_first(path: str | Path, line: int, issues: list[Issue]) -> None:
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
            raise_first(path, n, check_query_record(obj))
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
            raise_first(path, n, check_pool_record(obj))
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


def read_qids(path: str | Path) -> list[str]:
    """Query ids of a query jsonl in file order; a bad record raises MBEIRFormatError (FILE:LINE)."""
    return read_queries(path, validate=True).column("qid").to_pylist()


def read_dids(path: str | Path) -> list[str]:
    """Candidate ids of a pool jsonl in file order; a bad record raises MBEIRFormatError (FILE:LINE)."""
    return read_pool(path, validate=True).column("did").to_pylist()


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
