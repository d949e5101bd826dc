"""The embedding driver's bookkeeping: shard commits and the restart contract of an output directory.

Rows arrive from the Ray Data pipeline in any order; `ShardCommitter` buffers a shard until all its
rows have arrived, then commits it: rejects file, parquet (tmp + rename), progress file. What the
driver keeps per row beyond the shards in flight is `CommittedIds` (12 B per kept id, numpy); the
per-shard work is vectorised (a Python object per row exists only for rejected rows).

The restart contract (the functions below the committer): `load_state` takes the previous run's
manifest or progress file when its settings fingerprint matches, `verify_shard` checks each shard
it lists before that shard is skipped, `clean_output` / `remove_temp_files` clear what must not be
reused, and `finalize` writes rejects.jsonl and then the manifest, which marks the directory
complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError
from umarvel_ray.embed.decode import FIELDS, InputIndex, ShardSpec
from umarvel_ray.embed.dedup import CommittedIds, find_duplicates
from umarvel_ray.io import atomic_write_json, atomic_write_lines
from umarvel_ray.store import (
    MANIFEST_NAME,
    read_manifest,
    remove_embeddings,
    shard_footer,
    shard_name,
    write_manifest,
    write_shard,
)

log = logging.getLogger("umarvel_ray.embed")

PROGRESS_NAME = "_progress.json"
REJECTS_NAME = "rejects.jsonl"
REJECTS_DIR = "_rejects"
RESULT_COLUMNS = ("shard", "line", "id", "modality", "reject_field", "reject_reason", "vector")


class InjectedFailure(RuntimeError):
    """Raised by `fail_after_shards` to simulate a job killed part-way (tests)."""


def rejects_path(out: Path, spec_name: str) -> Path:
    """The per-shard rejects file of shard `spec_name` (concatenated into rejects.jsonl at the end)."""
    return out / REJECTS_DIR / spec_name.replace(".parquet", ".jsonl")


@dataclass
class _Buffer:
    expected: int
    received: int = 0
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)


class ShardCommitter:
    """Buffers rows per shard and commits each shard once all its rows have arrived.

    `seen` (None: duplicates are not checked) holds the ids of every committed shard; `cpu_s` is
    the CPU time this bookkeeping took in the driver thread (seconds); `peak_buffered` the most
    rows held at once in incomplete shards (what bounds the driver's row memory).
    """

    def __init__(
        self,
        out: Path,
        state: dict[str, Any],
        specs: dict[int, ShardSpec],
        input_path: Path,
        kind: str,
        seen: CommittedIds | None,
        progress_path: Path,
        fail_after: int | None = None,
    ):
        self.out, self.state, self.specs = out, state, specs
        self.input_path, self.kind = str(input_path), kind
        self.seen, self.progress_path, self.fail_after = seen, progress_path, fail_after
        self.buffers = {i: _Buffer(s.rows_in) for i, s in specs.items()}
        self.committed = 0
        self.cpu_s = 0.0
        self.buffered = self.peak_buffered = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        t0 = time.thread_time()
        try:
            self._add(batch)
        finally:
            self.cpu_s += time.thread_time() - t0

    def _add(self, batch: dict[str, np.ndarray]) -> None:
        got = np.asarray(batch["vector"]).shape[-1]
        if got != self.state["dim"]:
            raise RuntimeError(f"the model returned {got}-d vectors, its config says {self.state['dim']}")
        shards = np.asarray(batch["shard"])
        for s in np.unique(shards):
            rows = np.flatnonzero(shards == s)
            buf = self.buffers.get(int(s))
            if buf is None:
                raise RuntimeError(f"row for shard {s} that is not pending")
            buf.parts.append({k: np.asarray(batch[k])[rows] for k in RESULT_COLUMNS})
            buf.received += len(rows)
            self.buffered += len(rows)
            self.peak_buffered = max(self.peak_buffered, self.buffered)
            if buf.received > buf.expected:
                raise RuntimeError(f"shard {s}: {buf.received} rows > expected {buf.expected}")
            if buf.received == buf.expected:
                self.commit(int(s))

    def commit_empty(self) -> None:
        """Shards with no rows at all (only blank lines) never receive a batch: commit them."""
        for s, buf in list(self.buffers.items()):
            if buf.expected == 0:
                self.commit(s)

    def _reject_duplicates(self, cols: dict[str, np.ndarray], reasons: dict[int, str]) -> np.ndarray:
        """Add duplicate rows of this shard to `reasons` (row -> reason); the kept rows' id hashes."""
        assert self.seen is not None
        cand = np.flatnonzero(cols["reject_field"] == "")
        dups = find_duplicates(cols["id"][cand], self.seen)
        for row, s in zip(cand[dups.embedded].tolist(), dups.embedded_in.tolist(), strict=True):
            reasons[row] = f"duplicate id {cols['id'][row]!r} (already embedded in {shard_name(s)})"
        for row, first in zip(cand[dups.repeated].tolist(), cand[dups.first].tolist(), strict=True):
            reasons[row] = f"duplicate id {cols['id'][row]!r} (first at line {int(cols['line'][first])})"
        return dups.kept_hashes

    def commit(self, s: int) -> None:
        spec, buf = self.specs[s], self.buffers.pop(s)
        self.buffered -= buf.received
        dim = self.state["dim"]
        cols = {
            k: np.concatenate([p[k] for p in buf.parts]) if buf.parts else np.zeros(0, object)
            for k in RESULT_COLUMNS
        }
        order = np.argsort(cols["line"], kind="stable") if buf.parts else np.zeros(0, int)
        cols = {k: v[order] for k, v in cols.items()}
        dup_reasons: dict[int, str] = {}
        kept_hashes = self._reject_duplicates(cols, dup_reasons) if self.seen is not None else None
        rejected = cols["reject_field"] != ""
        rejected[list(dup_reasons)] = True
        id_key = FIELDS[self.kind][0]
        rejects = []
        for i in np.flatnonzero(rejected).tolist():
            field_name, reason = str(cols["reject_field"][i]), str(cols["reject_reason"][i])
            if i in dup_reasons:
                field_name, reason = id_key, dup_reasons[i]
            rid, line = str(cols["id"][i]), int(cols["line"][i])
            rejects.append(
                {
                    "id": rid or None,
                    "file": self.input_path,
                    "line": line,
                    "field": field_name,
                    "reason": reason,
                }
            )
        rej_path = rejects_path(self.out, spec.name)
        rej_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_lines(rej_path, (json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        idx = np.flatnonzero(~rejected)
        vectors = np.asarray(cols["vector"], dtype=np.float32).reshape(-1, dim)[idx]
        path = write_shard(self.out / spec.name, cols["id"][idx].astype(str), cols["modality"][idx], vectors)
        if self.seen is not None and kept_hashes is not None:
            self.seen.add(s, kept_hashes)
        self.state["shards"][spec.name] = {
            "name": spec.name,
            "index": spec.index,
            "first_line": spec.first_line,
            "last_line": spec.last_line,
            "rows_in": spec.rows_in,
            "rows_out": len(idx),
            "rows_rejected": len(rejects),
            "bytes": path.stat().st_size,
        }
        atomic_write_json(self.progress_path, self.state)
        self.committed += 1
        log.debug("committed %s: %d rows, %d rejected", spec.name, len(idx), len(rejects))
        if self.fail_after is not None and self.committed >= self.fail_after:
            raise InjectedFailure(f"fail_after_shards={self.fail_after}: stopping after {spec.name}")


def verify_shard(out: Path, entry: dict[str, Any], spec: ShardSpec, dim: int | None) -> str | None:
    """None when a committed shard is intact and matches the index, else why it is not."""
    if entry.get("rows_in") != spec.rows_in or entry.get("first_line") != spec.first_line:
        return "manifest entry does not match the input layout"
    if entry["rows_in"] != entry.get("rows_out", -1) + entry.get("rows_rejected", -1):
        return "manifest entry rows do not add up"
    path = out / spec.name
    if not path.is_file():
        return "shard file missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"shard file size {path.stat().st_size} != {entry.get('bytes')}"
    try:
        n, vdim = shard_footer(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means "recompute"
        return f"unreadable shard: {exc}"
    if n != entry["rows_out"]:
        return f"shard has {n} rows, manifest says {entry['rows_out']}"
    if dim is not None and vdim != dim:
        return f"shard dim {vdim} != {dim}"
    rej = rejects_path(out, spec.name)
    if not rej.is_file():
        return "rejects file missing"
    with rej.open("rb") as f:
        n_rej = sum(1 for line in f if line.strip())
    if n_rej != entry["rows_rejected"]:
        return f"rejects file has {n_rej} rows, manifest says {entry['rows_rejected']}"
    return None


def _read_state_file(out: Path, name: str) -> dict[str, Any] | None:
    """The manifest (through the store's reader) or the progress file; None when it is absent."""
    p = out / name
    if not p.is_file():
        return None
    return read_manifest(out) if name == MANIFEST_NAME else json.loads(p.read_text())


def load_state(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any], bool]:
    """The previous run's state (manifest or progress) if its settings match, else a fresh one."""
    for name in (MANIFEST_NAME, PROGRESS_NAME):
        try:
            state = _read_state_file(out, name)
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", out / name)
            continue
        if state is None:
            continue
        if state.get("settings") == settings:
            shards = state.get("shards") or {}
            if isinstance(shards, list):  # the final manifest lists shards in order
                shards = {e["name"]: e for e in shards}
            return {"settings": settings, "dim": state.get("dim"), "shards": shards}, True
        if not overwrite:
            diff = sorted(
                k
                for k in set(settings) | set(state.get("settings", {}))
                if settings.get(k) != state.get("settings", {}).get(k)
            )
            raise ConfigError(
                f"{out} holds embeddings made with other settings (differs in {diff}); "
                "use another output_dir or overwrite=true"
            )
        break
    return {"settings": settings, "dim": None, "shards": {}}, False


def clean_output(out: Path) -> None:
    """Remove every artefact this pipeline writes (overwrite=true or settings changed)."""
    remove_embeddings(out)
    for name in (PROGRESS_NAME, REJECTS_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / REJECTS_DIR, ignore_errors=True)


def remove_temp_files(out: Path) -> int:
    """Temp files of killed writers (`.<name>.tmp-<pid>`); no other writer owns this directory."""
    n = 0
    for d in (out, out / REJECTS_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def finalize(
    out: Path, state: dict[str, Any], index: InputIndex, kind: str, input_path: Path
) -> dict[str, Any]:
    """Write rejects.jsonl (all shards, in order) and manifest.json (last); drop the progress file."""
    entries = [state["shards"][s.name] for s in index.shards]
    atomic_write_lines(out / REJECTS_NAME, (rejects_path(out, s.name).read_bytes() for s in index.shards))
    settings = state["settings"]
    manifest = {
        "model": settings["model"],
        "dim": state["dim"],
        "dtype": "float32",
        "kind": kind,
        "input": str(input_path),
        "rows_in": sum(e["rows_in"] for e in entries),
        "rows_out": sum(e["rows_out"] for e in entries),
        "rows_rejected": sum(e["rows_rejected"] for e in entries),
        "shards": entries,
        "instruction": settings["instruction"],
        "settings": settings,
        "complete": True,
    }
    write_manifest(out, manifest)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


__all__ = [
    "PROGRESS_NAME",
    "REJECTS_DIR",
    "REJECTS_NAME",
    "RESULT_COLUMNS",
    "InjectedFailure",
    "ShardCommitter",
    "clean_output",
    "finalize",
    "load_state",
    "rejects_path",
    "remove_temp_files",
    "verify_shard",
]
