"""Ray Data embedding pipeline: exact vectors, rejects accounting, restart, manifest.

A hand-written pool (exact control over every bad row) and the tiny Qwen2-VL. Three pipeline runs
in all (a candidate run killed after two shards collating in CPU tasks, its resume collating in
the actors, and one query run); everything else checks their outputs or calls the CPU stage
directly without Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue, instructions, model_items, writers
from umarvel_ray.data.images import load_image
from umarvel_ray.embed import decode
from umarvel_ray.embed.commit import InjectedFailure
from umarvel_ray.embed.config import EmbedConfig, validate_config
from umarvel_ray.embed.run import EmbedResult, run_embedding
from umarvel_ray.store import read_embeddings

SHARD_ROWS = 5

GOOD_POOL = [
    {"did": "1:1", "txt": "a red cube on the left", "img_path": None, "modality": "text"},
    {"did": "1:2", "txt": None, "img_path": "img/0.jpg", "modality": "image"},
    {"did": "1:3", "txt": "two blue stars", "img_path": "img/1.png", "modality": "image,text"},
    {"did": "1:4", "txt": "a green circle", "img_path": None, "modality": "text"},
    {"did": "1:5", "txt": None, "img_path": "img/2.jpg", "modality": "image"},
    {"did": "1:6", "txt": "an orange diamond, large", "img_path": "img/3.jpg", "modality": "image,text"},
    {"did": "1:7", "txt": "small pink crosses", "img_path": None, "modality": "text"},
    {"did": "1:8", "txt": None, "img_path": "img/1.png", "modality": "image"},
    {"did": "1:9", "txt": "a cyan triangle", "img_path": "img/0.jpg", "modality": "image,text"},
    {"did": "1:10", "txt": "purple squares", "img_path": None, "modality": "text"},
    {"did": "1:11", "txt": "a yellow star", "img_path": None, "modality": "text"},
]

# (line content, expected reject field, a word the reason must contain); inserted between good rows.
BAD_POOL = [
    ('{"did": "1:90", "txt": "broken', "<json>", "malformed json"),
    (
        json.dumps({"did": "1:91", "txt": None, "img_path": "img/missing.jpg", "modality": "image"}),
        "img_path",
        "missing",
    ),
    (
        json.dumps({"did": "1:92", "txt": None, "img_path": "img/corrupt.jpg", "modality": "image"}),
        "img_path",
        "image",
    ),
    (
        json.dumps({"did": "1:93", "txt": " ", "img_path": None, "modality": "text"}),
        "txt+img_path",
        "empty item",
    ),
    (
        json.dumps({"did": "1:94", "txt": "t", "img_path": None, "modality": "audio"}),
        "modality",
        "unknown modality",
    ),
    (json.dumps({"did": "1:4", "txt": "again", "img_path": None, "modality": "text"}), "did", "duplicate id"),
]


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for i, (h, w) in enumerate([(60, 90), (84, 84), (100, 70), (50, 120)]):
        base = rng.integers(0, 255, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        im.save(root / "img" / (f"{i}.png" if i == 1 else f"{i}.jpg"))
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Images, a pool with planted bad rows (and a blank line), queries and an instruction tsv."""
    root = tmp_path_factory.mktemp("embed_data")
    _write_images(root)
    lines = [json.dumps(r) for r in GOOD_POOL]
    for k, (line, _, _) in enumerate(BAD_POOL):
        lines.insert(2 * k + 1, line)
    lines.insert(9, "")  # a blank line is not a row
    (root / "pool.jsonl").write_text("\n".join(lines) + "\n")
    queries = [
        {
            "qid": "9:1",
            "query_txt": "find a red cube",
            "query_img_path": None,
            "query_modality": "text",
            "task_id": 0,
        },
        {
            "qid": "9:2",
            "query_txt": None,
            "query_img_path": "img/0.jpg",
            "query_modality": "image",
            "task_id": 3,
        },
        {
            "qid": "9:3",
            "query_txt": "make it blue",
            "query_img_path": "img/2.jpg",
            "query_modality": "image,text",
            "task_id": 7,
        },
        {
            "qid": "9:4",
            "query_txt": "two stars",
            "query_img_path": None,
            "query_modality": "text",
            "task_id": 1,
        },
        {
            "qid": "9:5",
            "query_txt": "what is this",
            "query_img_path": "img/1.png",
            "query_modality": "image,text",
            "task_id": 6,
        },
    ]
    for q in queries:
        q.update(pos_cand_list=["1:1"], neg_cand_list=[], query_src_content=None)
    writers.write_queries(root / "queries.jsonl", queries)
    rows = [
        instructions.InstructionRow(qm, cm, "MSCOCO", 9, tuple(f"P{p} {qm} to {cm}:" for p in range(4)))
        for qm, cm in {catalogue.task_modalities(q["task_id"]) for q in queries}
    ]
    instructions.write_instructions(root / "instructions" / "query_instructions.tsv", rows)
    return root


def _cfg(root: Path, model_dir: Path, out: Path, **kw) -> EmbedConfig:
    base = dict(
        input="pool.jsonl",
        data_root=str(root),
        model=str(model_dir),
        output_dir=str(out),
        shard_rows=SHARD_ROWS,
        chunk_rows=3,
        batch_size=2,
        actor_num_cpus=0.5,
        decode_num_cpus=0.5,
        max_decode_tasks=2,
        progress_every_s=1.0,
    )
    base.update(kw)
    return EmbedConfig(**base)


def _direct_items(root: Path, rows: list[dict], kind: str, prompt_index: int | None = None) -> list[dict]:
    instr = instructions.read_instructions(root / "instructions" / "query_instructions.tsv")
    items = []
    for r in rows:
        item = (
            model_items.query_item(r, instr, prompt_index=prompt_index)
            if kind == "query"
            else model_items.candidate_item(r)
        )
        if item["image"]:
            item["image"] = load_image(root, item["image"])
        items.append(item)
    return items


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    from umarvel_ray.model.embedder import Embedder

    return Embedder.load(tiny_model_dir)


# ------------------------------------------------------------------------------------------------
# CPU stage, no Ray
# ------------------------------------------------------------------------------------------------


def test_index_input_layout(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [f'{{"n": {i}}}' if i != 4 else "  " for i in range(1, 13)]
    p.write_text("\n".join(lines))  # no trailing newline on the last line
    idx = decode.index_input(p, shard_rows=5, chunk_rows=2)
    assert [(s.first_line, s.last_line, s.rows_in) for s in idx.shards] == [
        (1, 5, 4),
        (6, 10, 5),
        (11, 12, 2),
    ]
    assert idx.rows_in == 11 and idx.lines == 12
    data = p.read_bytes()
    got = []
    for s in idx.shards:
        assert [c.shard for c in s.chunks] == [s.index] * len(s.chunks)
        assert all(c.end - c.start > 0 for c in s.chunks)
        for c in s.chunks:
            piece = data[c.start : c.end].split(b"\n")
            got += [(c.first_line + i, line) for i, line in enumerate(piece) if line]
    assert got == [(i + 1, line.encode()) for i, line in enumerate(lines)]
    assert decode.index_input(p, 5, 2).sha256 == idx.sha256


def _run_cpu_stage(
    root: Path, model: Path, path: str, kind: str, collate: bool, **kw
) -> list[tuple[dict, object]]:
    idx = decode.index_input(root / path, SHARD_ROWS, 3)
    groups = []
    for rec in decode.chunk_records(idx.shards):
        out = decode.decode_chunks(
            {k: np.array([v]) for k, v in rec.items()},
            input_path=str(root / path),
            kind=kind,
            data_root=str(root),
            batch_size=2,
            collate=collate,
            model=str(model),
            **kw,
        )
        groups += [decode.unpack_group(m, p) for m, p in zip(out["meta"], out["payload"], strict=True)]
    return groups


def test_cpu_stage_rejects_and_images(data_root, tiny_model_dir):
    groups = _run_cpu_stage(data_root, tiny_model_dir, "pool.jsonl", "candidate", collate=False)
    rejects, items, ids = {}, {}, []
    for meta, payload in groups:
        ok = np.flatnonzero(meta["reject_field"] == "")
        for i in np.flatnonzero(meta["reject_field"] != ""):
            rejects[int(meta["line"][i])] = (meta["id"][i], meta["reject_field"][i], meta["reject_reason"][i])
        if len(ok):
            assert len(ok) <= 2 and len(payload["items"]) == len(ok)
            ids += [meta["id"][i] for i in ok]
            items.update(
                {
                    meta["id"][i]: it
                    for i, it in zip(ok, payload["items"], strict=True)
                    if it["text"] != "again"
                }
            )
    # duplicates are the driver's job: the CPU stage only sees one row at a time
    assert sorted(ids) == sorted([r["did"] for r in GOOD_POOL] + ["1:4"])
    assert {v[1] for v in rejects.values()} == {b[1] for b in BAD_POOL[:-1]}
    lines = (data_root / "pool.jsonl").read_text().splitlines()
    for line_no, (rid, field, reason) in rejects.items():
        bad = next(b for b in BAD_POOL if b[0] == lines[line_no - 1])
        assert (field, bad[2] in reason) == (bad[1], True)
        assert rid == ("" if field == "<json>" else json.loads(bad[0])["did"])
    for r in GOOD_POOL:
        want = load_image(data_root, r["img_path"]) if r["img_path"] else None
        got = items[r["did"]]["image"]
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)


def test_cpu_collator_matches_embedder(data_root, tiny_model_dir, embedder):
    """Collating in CPU tasks (no weights loaded) must build exactly the embedder's own batch."""
    groups = _run_cpu_stage(data_root, tiny_model_dir, "pool.jsonl", "candidate", collate=True)
    lines = (data_root / "pool.jsonl").read_text().splitlines()
    n = 0
    for meta, payload in groups:
        if payload is None:
            continue
        rows = [json.loads(lines[meta["line"][i] - 1]) for i in np.flatnonzero(meta["reject_field"] == "")]
        want = embedder.collate(_direct_items(data_root, rows, "candidate"), is_query=False)
        got = payload["collated"]
        if "pixel_patches" in want:  # images travel as uint8 patches: the resized image's bytes
            assert got["pixel_patches"].dtype == np.uint8 and "pixel_values" not in got
            grids = want["image_grid_thw"].numpy()
            assert got["pixel_patches"].nbytes == 3 * 14 * 14 * int(grids.prod(axis=1).sum())
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
        n += len(rows)
    assert n == len(GOOD_POOL) + 1


def test_random_instructions_are_seeded_per_query(data_root, tiny_model_dir):
    instr_path = str(data_root / "instructions" / "query_instructions.tsv")
    instr = instructions.read_instructions(instr_path)
    rows = {json.loads(line)["qid"]: json.loads(line) for line in (data_root / "queries.jsonl").open()}

    def drawn(seed: int) -> dict[str, str]:
        groups = _run_cpu_stage(
            data_root,
            tiny_model_dir,
            "queries.jsonl",
            "query",
            collate=False,
            instructions_path=instr_path,
            seed=seed,
        )
        return {m["id"][i]: it["instruction"] for m, p in groups for i, it in enumerate(p["items"])}

    a, b = drawn(0), drawn(1)
    assert a == drawn(0)
    for qid, text in a.items():
        r = rows[qid]
        qm, cm = r["query_modality"], catalogue.task_modalities(r["task_id"])[1]
        assert text == instr.get(9, qm, cm, rng=decode.query_rng(0, qid))
    assert a != b  # 5 queries x 4 prompts: two seeds agreeing everywhere is a 1/1024 chance


def test_config_validation_before_ray(data_root, tiny_model_dir, tmp_path):
    ok = _cfg(data_root, tiny_model_dir, tmp_path / "o")
    validate_config(ok)
    bad = [
        (dict(input="nope.jsonl"), "input file not found"),
        (dict(model=str(tmp_path / "no_model")), "model directory not found"),
        (dict(kind="passage"), "kind must be"),
        (dict(batch_size=0), "batch_size"),
        (dict(kind="query", input="queries.jsonl", prompt_index=7), "prompt_index"),
        (
            dict(kind="query", input="queries.jsonl", instructions="missing.tsv"),
            "instructions file not found",
        ),
        (dict(collate_in="gpu"), "collate_in"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            run_embedding(_cfg(data_root, tiny_model_dir, tmp_path / "o", **kw))
    assert not (tmp_path / "o").exists()


def test_blank_input_needs_no_ray(data_root, tiny_model_dir, embedder, tmp_path):
    """Shards holding only blank lines are committed empty (with the model's dim) without Ray work."""
    (tmp_path / "blank.jsonl").write_text("\n  \n\n\n\n\n\n")
    r = run_embedding(_cfg(data_root, tiny_model_dir, tmp_path / "o", input=str(tmp_path / "blank.jsonl")))
    assert (r.rows_in, r.rows_out, r.rows_rejected, r.shards_written, r.dim) == (0, 0, 0, 2, embedder.dim)
    emb = read_embeddings(tmp_path / "o")
    assert emb.vectors.shape == (0, embedder.dim)
    assert (tmp_path / "o" / "rejects.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------------------
# Ray pipeline
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def candidate_run(ray_cluster, data_root, tiny_model_dir, tmp_path_factory):
    """Kill the job after 2 committed shards, damage one of them, leave a temp file, resume."""
    out = tmp_path_factory.mktemp("emb_cand")
    cfg = _cfg(data_root, tiny_model_dir, out, fail_after_shards=2, collate_in="tasks")
    with pytest.raises(InjectedFailure):
        run_embedding(cfg)
    progress = json.loads((out / "_progress.json").read_text())
    committed = sorted(progress["shards"])
    assert len(committed) == 2 and not (out / "manifest.json").exists()
    damaged, kept = committed
    size = (out / damaged).stat().st_size
    with open(out / damaged, "r+b") as f:  # truncated: footer gone
        f.truncate(size // 2)
    (out / ".part-00009.parquet.tmp-12345").write_bytes(b"half written")
    os.utime(out / kept, (1_000_000_000, 1_000_000_000))  # an mtime the rerun must not change
    first = {"committed": committed, "kept_mtime": (out / kept).stat().st_mtime_ns}
    time.sleep(0.01)
    # collate_in does not change vectors, so the resume may use the other mode: the shards of both
    # runs are then checked against the direct encoding (and the light decode workers save time).
    result = run_embedding(_cfg(data_root, tiny_model_dir, out, collate_in="actor"))
    return out, result, first


def test_candidates_equal_direct_encoding(candidate_run, data_root, embedder):
    out, result, _ = candidate_run
    emb = read_embeddings(out)
    assert sorted(emb.ids) == sorted(r["did"] for r in GOOD_POOL)  # exactly one row per valid id
    direct = embedder.encode_candidates(_direct_items(data_root, GOOD_POOL, "candidate"), batch_size=4)
    order = {rid: i for i, rid in enumerate(emb.ids)}
    got = emb.vectors[[order[r["did"]] for r in GOOD_POOL]]
    np.testing.assert_allclose(got, direct, atol=1e-4)
    assert list(emb.modalities[[order[r["did"]] for r in GOOD_POOL]]) == [r["modality"] for r in GOOD_POOL]
    assert result.dim == embedder.dim == emb.vectors.shape[1]


def test_rejects_accounting(candidate_run, data_root):
    out, result, _ = candidate_run
    n_rows = len(GOOD_POOL) + len(BAD_POOL)
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (n_rows, len(GOOD_POOL), len(BAD_POOL))
    assert "rows_in=17, rows_out=11, rows_rejected=6" in result.summary
    # the resumed run embedded something, so it knows when its first batch arrived
    assert 0 < result.first_result_s < result.seconds and 0 < result.rows_at_first_result <= n_rows
    assert 0 < result.bookkeeping_cpu_s < result.seconds
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    lines = (data_root / "pool.jsonl").read_text().splitlines()
    assert len(rejects) == len(BAD_POOL)
    for rej in rejects:
        assert set(rej) == {"id", "file", "line", "field", "reason"}
        assert rej["file"] == str(data_root / "pool.jsonl")
        bad = next(b for b in BAD_POOL if b[0] == lines[rej["line"] - 1])  # the line points at the bad row
        assert rej["field"] == bad[1] and bad[2] in rej["reason"]
    dup = next(r for r in rejects if r["field"] == "did")
    assert dup["id"] == "1:4" and dup["line"] > lines.index(json.dumps(GOOD_POOL[3])) + 1


def test_rate_after_startup_leaves_out_the_first_batch():
    r = EmbedResult(Path("x"), rows_in=88, rows_out=88, rows_rejected=0, dim=4, seconds=10.0)
    assert r.rows_per_s_after_startup is None  # nothing was embedded in this run
    r.first_result_s, r.rows_at_first_result = 2.0, 8
    assert r.rows_per_s_after_startup == pytest.approx(80 / 8.0)


def test_restart_skips_verified_shards_only(candidate_run):
    out, result, first = candidate_run
    damaged, kept = first["committed"]
    assert (out / kept).stat().st_mtime_ns == first["kept_mtime"]  # verified and skipped
    assert result.shards_skipped == 1 and result.shards_written == 3
    assert pq.ParquetFile(out / damaged).metadata.num_rows >= 1  # recomputed, readable again
    assert not list(out.glob(".*.tmp-*")) and not (out / "_progress.json").exists()
    # Once complete, a rerun verifies everything and computes nothing (no Ray work at all).
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = run_embedding(EmbedConfig(**_load_yaml(out / "config.yaml")))
    assert again.shards_written == 0 and again.shards_skipped == 4 and again.rows_out == result.rows_out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == mtimes


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_manifest_and_config(candidate_run, data_root, tiny_model_dir):
    out, result, _ = candidate_run
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] is True and man["kind"] == "candidate" and man["dtype"] == "float32"
    assert man["model"] == str(tiny_model_dir) and man["dim"] == result.dim
    assert man["input"] == str(data_root / "pool.jsonl") and man["instruction"] is None
    assert (man["rows_in"], man["rows_out"], man["rows_rejected"]) == (17, 11, 6)
    shards = man["shards"]
    assert [s["name"] for s in shards] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert sum(s["rows_in"] for s in shards) == 17
    for s in shards:
        assert s["rows_in"] == s["rows_out"] + s["rows_rejected"]
        assert pq.ParquetFile(out / s["name"]).metadata.num_rows == s["rows_out"]
    assert _load_yaml(out / "config.yaml")["shard_rows"] == SHARD_ROWS
    # Other settings on the same output directory are refused, not silently mixed.
    with pytest.raises(ConfigError, match="other settings"):
        run_embedding(_cfg(data_root, tiny_model_dir, out, shard_rows=4))


def test_queries_fixed_prompt_equal_direct_encoding(
    ray_cluster, data_root, tiny_model_dir, embedder, tmp_path
):
    out = tmp_path / "q"
    cfg = _cfg(
        data_root,
        tiny_model_dir,
        out,
        kind="query",
        input="queries.jsonl",
        prompt_index=2,
        collate_in="actor",
    )
    result = run_embedding(cfg)
    rows = [json.loads(line) for line in (data_root / "queries.jsonl").open()]
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (5, 5, 0)
    emb = read_embeddings(out)
    order = {rid: i for i, rid in enumerate(emb.ids)}
    direct = embedder.encode_queries(_direct_items(data_root, rows, "query", prompt_index=2), batch_size=3)
    np.testing.assert_allclose(emb.vectors[[order[r["qid"]] for r in rows]], direct, atol=1e-4)
    other = embedder.encode_queries(_direct_items(data_root, rows, "query", prompt_index=0), batch_size=3)
    assert np.abs(emb.vectors[[order[r["qid"]] for r in rows]] - other).max() > 1e-3  # the prompt matters
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "query"
    assert man["instruction"]["mode"] == "fixed" and man["instruction"]["prompt_index"] == 2


@pytest.mark.gpu
@pytest.mark.ray
def test_gpu_actor_matches_cpu_encoding(ray_cluster, data_root, tiny_model_dir, embedder, tmp_path):
    """With a GPU the actors take one each; vectors agree with the CPU reference (TF32 convs aside)."""
    result = run_embedding(_cfg(data_root, tiny_model_dir, tmp_path / "g", use_gpu="true"))
    assert (result.rows_out, result.rows_rejected) == (len(GOOD_POOL), len(BAD_POOL))
    emb = read_embeddings(tmp_path / "g")
    order = {rid: i for i, rid in enumerate(emb.ids)}
    direct = embedder.encode_candidates(_direct_items(data_root, GOOD_POOL, "candidate"), batch_size=4)
    cos = (emb.vectors[[order[r["did"]] for r in GOOD_POOL]] * direct).sum(1)
    assert cos.min() > 0.999
