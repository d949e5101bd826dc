"""The M-BEIR query instruction tsv: its rows, parsed, looked up, read and written.

One row per (dataset_id, query modality, candidate modality) with up to four prompts (UniIR's
`query_instructions.tsv`, columns by position). The readers and `validate.py` share
`parse_instruction_row`, so a tsv that validates also reads.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from umarvel_ray.data.catalogue import DATASET_NAMES
from umarvel_ray.data.mbeir import MODALITIES, Issue, MBEIRFormatError


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
