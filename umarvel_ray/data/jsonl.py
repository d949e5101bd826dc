"""The one line reader for every jsonl (and line-oriented text) file the project reads.

Every job (validate, the `read_*` readers, embedding, evaluation, mining, teacher scoring,
training data) splits, decodes and parses lines through this module, so one file can never be
read as 3 rows by one job and 1 row by another. The rules:

* Line ends: LF, CRLF and a bare CR each end a line (Python's universal newlines,
  https://docs.python.org/3/glossary.html#term-universal-newlines). JSON never has a raw CR or LF
  inside a string (RFC 8259 section 7: control characters must be escaped), so splitting on them
  can never cut a valid record. Other Unicode line separators (U+2028, U+0085, ...) are NOT line
  ends: they may appear raw inside JSON strings (which is why `str.splitlines` is not used).
* Byte-order mark: a UTF-8 BOM at the very start of the file is accepted and dropped (the
  `utf-8-sig` codec's rule); a BOM anywhere else is content, and makes that line malformed json.
* Encoding: UTF-8, strict. A line that is not UTF-8 is a malformed row, not a crash.
* Blank lines (nothing but spaces and tabs, JSON's remaining whitespace) are not rows: every
  reader skips them, but they keep their line numbers, so FILE:LINE always points at the file.

Byte offsets (`Line.start`, `Line.end`) let the embedding pipeline cut a file into byte ranges
that hold whole lines and re-read one range in a worker with exactly the same result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BOM = b"\xef\xbb\xbf"
BLANK_CHARS = b" \t"


@dataclass(frozen=True)
class Line:
    """One physical line: 1-based `number`, content bytes [start, content_end), terminator to `end`."""

    number: int
    start: int
    end: int
    content: bytes

    @property
    def blank(self) -> bool:
        """Blank lines are not rows (see the module rules)."""
        return not self.content.strip(BLANK_CHARS)


def iter_lines(f: IO[bytes], offset: int = 0, first_line: int = 1) -> Iterator[Line]:
    """Split a binary stream positioned at byte `offset` into `Line`s under the module's rules.

    `offset` is the stream's position in the file: a BOM is dropped only when it sits at byte 0.
    """
    number, pos = first_line, offset
    for raw in f:  # splits after each LF; CR and CRLF are handled inside each piece
        if raw.endswith(b"\r\n"):
            body, term = raw[:-2], 2
        elif raw.endswith(b"\n"):
            body, term = raw[:-1], 1
        else:
            body, term = raw, 0
        pieces = body.split(b"\r")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if last and term == 0 and not piece:
                break  # nothing after the final line end
            end = pos + len(piece) + (term if last else 1)
            start = pos
            if pos == 0 and piece.startswith(BOM):
                piece, start = piece[len(BOM) :], len(BOM)
            yield Line(number, start, end, piece)
            number, pos = number + 1, end


def iter_file_lines(path: str | Path) -> Iterator[Line]:
    """All lines of a file (blank ones included)."""
    with open(path, "rb") as f:
        yield from iter_lines(f)


def read_range(path: str | Path, start: int, end: int, first_line: int) -> list[Line]:
    """The lines of bytes [start, end) of a file; `start` must be a line start found by `iter_lines`."""
    import io

    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return list(iter_lines(io.BytesIO(data), offset=start, first_line=first_line))


def decode_text(content: bytes) -> tuple[str | None, str | None]:
    """(text, None), or (None, why) when the bytes are not UTF-8."""
    try:
        return content.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte {content[e.start:e.start + 1]!r} at column {e.start + 1}"


def parse_json(content: bytes) -> tuple[Any, str | None]:
    """(object, None), or (None, why) for a line that is not one UTF-8 JSON value."""
    text, err = decode_text(content)
    if err is not None:
        return None, f"malformed json: {err}"
    try:
        return json.loads(text), None  # type: ignore[arg-type]
    except json.JSONDecodeError as e:
        return None, f"malformed json: {e.msg} at column {e.colno}"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, object or None, error or None) for every non-blank line of a jsonl file."""
    for line in iter_file_lines(path):
        if not line.blank:
            obj, err = parse_json(line.content)
            yield line.number, obj, err


def iter_text(path: str | Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, error or None) for every non-blank line of a text file."""
    for line in iter_file_lines(path):
        if not line.blank:
            text, err = decode_text(line.content)
            yield line.number, text, err


def read_records(path: str | Path, limit: int = 0) -> list[dict[str, Any]]:
    """Every row (the first `limit` when > 0) of a jsonl of plain records: negatives, teacher
    scores, training pairs.

    Not for M-BEIR inputs (those go through `mbeir.read_*` with record checks). A malformed or
    non-object row raises ValueError with FILE:LINE: nothing is skipped silently.
    """
    rows = []
    for n, obj, err in iter_jsonl(path):
        if err is None and not isinstance(obj, dict):
            err = f"expected a json object, got {type(obj).__name__}"
        if err is not None:
            raise ValueError(f"{path}:{n}: field '<json>': {err}")
        rows.append(obj)
        if limit and len(rows) >= limit:
            break
    return rows


__all__ = [
    "BOM",
    "Line",
    "decode_text",
    "iter_file_lines",
    "iter_jsonl",
    "iter_lines",
    "iter_text",
    "parse_json",
    "read_range",
    "read_records",
]
