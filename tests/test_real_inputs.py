"""Files real users have (tests/bad_inputs.py): one line reader, exact ids, finite vectors, index
per pool size, the reference text rule, and parity with the standard tools (pytrec_eval, pyarrow,
plain faiss). Each case goes through validate, the readers, the embedding pipeline's CPU stage,
mining/teacher readers and evaluate; the Ray tests run the tiny model end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import CASES, Q0, make_cases

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue, jsonl, mbeir, model_items
from umarvel_ray.data.queries import read_query_meta
from umarvel_ray.data.validate import validate_dir
from umarvel_ray.embed import decode
from umarvel_ray.embed.actor import reject_non_finite
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.eval.embeddings import EmbeddingSet
from umarvel_ray.eval.evaluate import evaluate_stage, run_evaluation
from umarvel_ray.eval.plan import EvalConfig, InputError, plan_indexes, plan_tasks, pool_sizes, read_qids
from umarvel_ray.index import NonFiniteVectorError, build_index
from umarvel_ray.index.factory import factory_for_pool, min_train_vectors
from umarvel_ray.index.faiss_index import FaissIndex
from umarvel_ray.rerank.offsets import scan_offsets
from umarvel_ray.store import read_embeddings, shard_name, write_manifest, write_shard

P3 = "cand_pool/local/mbeir_mscoco_task3_cand_pool.jsonl"
Q0_IDS = ["9:0", "9:1", "9:2"]
ID_NEWLINE_ERROR = (
    "mbeir_mscoco_task0_test.jsonl:2: field 'qid': id '9:1\\n' is not of the form "
    "'<dataset_id>:<n>' (ASCII digits, no leading zeros)"
)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return make_cases(tmp_path_factory.mktemp("bad_inputs"))


def _cpu_stage(root: Path, rel: str, kind: str, **kw) -> tuple[dict[int, tuple[str, dict]], dict[int, tuple]]:
    """The embedding pipeline's CPU stage (the exact code Ray runs) over one file, no Ray:
    ({line: (id, item)}, {line: (id, field, reason)})."""
    idx = decode.index_input(root / rel, 10, 2)
    rows, rejects = {}, {}
    instr = str(root / mbeir.INSTRUCTIONS_FILE) if kind == "query" else None
    for rec in decode.chunk_records(idx.shards):
        out = decode.decode_chunks(
            {k: np.array([v]) for k, v in rec.items()},
            input_path=str(root / rel),
            kind=kind,
            data_root=str(root),
            batch_size=8,
            collate=False,
            model="unused",
            instructions_path=instr,
            prompt_index=0,
            **kw,
        )
        for m, p in zip(out["meta"], out["payload"], strict=True):
            meta, payload = decode.unpack_group(m, p)
            ok = np.flatnonzero(meta["reject_field"] == "")
            for j, i in enumerate(ok):
                rows[int(meta["line"][i])] = (meta["id"][i], payload["items"][j])
            for i in np.flatnonzero(meta["reject_field"] != ""):
                rejects[int(meta["line"][i])] = (meta["id"][i], meta["reject_field"][i], meta["reject_reason"][i])
    return rows, rejects


# ---------------------------------------------------------------------------------------------
# One line reader
# ---------------------------------------------------------------------------------------------


def test_line_reader_rules():
    def lines(data: bytes) -> list[tuple[int, bytes, bool]]:
        return [(ln.number, ln.content, ln.blank) for ln in jsonl.iter_lines(io.BytesIO(data))]

    want = [(1, b"a", False), (2, b"b", False)]
    assert lines(b"a\nb\n") == lines(b"a\r\nb\r\n") == lines(b"a\rb\r") == lines(b"a\rb") == want
    assert lines(b"\xef\xbb\xbfa\n\n \t\r\nc") == [(1, b"a", False), (2, b"", True), (3, b" \t", True), (4, b"c", False)]
    # A BOM that is not at byte 0 is content (and makes that line malformed json).
    assert lines(b"a\n\xef\xbb\xbfb") == [(1, b"a", False), (2, b"\xef\xbb\xbfb", False)]
    # U+2028 / U+0085 may sit raw inside a JSON string: they never end a line.
    rec = json.dumps({"t": "x\u2028y\x85z"}, ensure_ascii=False).encode()
    assert lines(rec + b"\n") == [(1, rec, False)]
    assert jsonl.parse_json(rec) == ({"t": "x\u2028y\x85z"}, None)
    assert jsonl.parse_json(b"\xff{}")[1].startswith("malformed json: not UTF-8")
    # Byte offsets cover the file exactly: a worker re-reading a range sees the same lines.
    data = b"\xef\xbb\xbf1\r\n2\r3\n\n4"
    got = list(jsonl.iter_lines(io.BytesIO(data)))
    assert got[-1].end == len(data) and all(data[ln.start : ln.start + len(ln.content)] == ln.content for ln in got)


def test_every_reader_reads_the_same_rows(cases):
    """bom/ and cr_only/ read as 3 rows, lines 1..3, in validate, read_queries, evaluate's qids,
    the embedding pipeline (index pass and CPU stage), mining and teacher readers."""
    for case in ("base", "bom", "cr_only", "quotes_cr"):
        root = cases / case
        rep = validate_dir(root)
        assert rep.ok, rep.format()
        assert next(f for f in rep.files if f.path.endswith(Q0)).rows == 3
        table = mbeir.read_queries(root / Q0)
        assert table.column("qid").to_pylist() == Q0_IDS and table.column("line").to_pylist() == [1, 2, 3]
        assert read_qids(root / Q0) == Q0_IDS
        assert decode.index_input(root / Q0, 10, 2).rows_in == 3
        rows, rejects = _cpu_stage(root, Q0, "query")
        assert rejects == {} and {n: r[0] for n, r in rows.items()} == {1: "9:0", 2: "9:1", 3: "9:2"}
        metas, _, n_read, invalid = read_query_meta(root / Q0)
        assert (list(metas), n_read, invalid) == (Q0_IDS, 3, 0)
        offsets = scan_offsets(root / Q0, set(Q0_IDS), id_key="qid")
        with open(root / Q0, "rb") as f:
            for qid, (off, n) in offsets.items():
                f.seek(off)
                assert jsonl.parse_json(f.read(n))[0]["qid"] == qid  # teacher re-reads by offset
        assert jsonl.read_records(root / Q0)[0]["qid"] == "9:0"  # training-data reader


def test_id_newline_is_the_same_error_everywhere(cases):
    root = cases / "id_newline"
    rep = validate_dir(root)
    assert not rep.ok and [str(p) for p in rep.problems()] == [f"{root / Q0}:2: field 'qid': " + ID_NEWLINE_ERROR.split("field 'qid': ")[1]]
    with pytest.raises(mbeir.MBEIRFormatError) as e:
        mbeir.read_queries(root / Q0)
    assert str(e.value).endswith(ID_NEWLINE_ERROR)
    rows, rejects = _cpu_stage(root, Q0, "query")  # embed: line 2 rejected with the same words
    assert sorted(rows) == [1, 3] and rejects[2][1:] == ("qid", ID_NEWLINE_ERROR.split("field 'qid': ")[1])
    assert read_query_meta(root / Q0)[3] == 1  # mining counts it invalid
    with pytest.raises(InputError) as e:  # evaluate refuses before any embedding
        plan_tasks(EvalConfig(data_root=str(root), model="unused", out_dir=str(root / "out")))
    assert ID_NEWLINE_ERROR in str(e.value)


def test_ids_that_would_share_an_integer_are_refused():
    assert mbeir.did_to_int("9:12") == 90_000_012 and mbeir.qid_to_int("9:1") == 4_500_001
    for bad in ("9:1\n", "9:012", "09:1", "9:\u0663", " 9:1", "9:1 ", "9:-1"):
        assert mbeir.id_problem(bad) is not None, bad
        with pytest.raises(ValueError):
            mbeir.did_to_int(bad)
    assert "n < 500000" in mbeir.id_problem("9:500000", mbeir.QID_STRIDE)
    assert mbeir.id_problem("9:500000", mbeir.DID_STRIDE) is None
    assert mbeir.parse_qrels_line("9:01 0 9:1 1 0") == ("qid", mbeir.id_problem("9:01", mbeir.QID_STRIDE))


# ---------------------------------------------------------------------------------------------
# Text rule (UniIR format_string) on queries and candidates
# ---------------------------------------------------------------------------------------------


def test_uniir_text_rule():
    assert model_items.normalize_text('"a red square"') == "A red square."
    assert model_items.normalize_text("a green\r\nsquare") == "A green\nsquare."
    assert model_items.normalize_text("  is it red?  ") == "Is it red?"
    assert model_items.normalize_text('""') == "" and model_items.normalize_text(None) == ""
    assert model_items.apply_text_rule('"x"', "none") == '"x"' and model_items.apply_text_rule('""', "uniir") is None
    with pytest.raises(ValueError, match="unknown text rule"):
        model_items.apply_text_rule("x", "lower")


def test_text_rule_in_the_embedding_stage(cases):
    root = cases / "quotes_cr"
    q, _ = _cpu_stage(root, Q0, "query")
    assert [q[n][1]["text"] for n in (1, 2, 3)] == ["A red square.", "A green\nsquare.", "A blue square."]
    c, _ = _cpu_stage(root, P3, "candidate")
    assert [c[n][1]["text"] for n in (1, 2, 3)] == ["A red square.", "A green square.", "A blue square."]
    q, _ = _cpu_stage(root, Q0, "query", text_rule="none")
    assert [q[n][1]["text"] for n in (1, 2, 3)] == ['"a red square"', "a green\r\nsquare", '"a blue square"']
    c, _ = _cpu_stage(root, P3, "candidate", text_rule="none")
    assert c[1][1]["text"] == "a red square"


# ---------------------------------------------------------------------------------------------
# Finite vectors, index per pool size
# ---------------------------------------------------------------------------------------------


def _unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_non_finite_vectors_refused_by_both_backends(backend):
    pool, queries = _unit(6), _unit(3, seed=1)
    ids = [f"9:{i}" for i in range(6)]
    bad = pool.copy()
    bad[4, 2] = np.nan
    with pytest.raises(NonFiniteVectorError, match=r"1 of 6 candidate vectors are not finite .*id '9:4'"):
        build_index(bad, ids, backend=backend, device="cpu")
    index = build_index(pool, ids, backend=backend, device="cpu")
    nanq = queries.copy()
    nanq[1, 0] = np.inf
    with pytest.raises(NonFiniteVectorError, match="1 of 3 query vectors are not finite"):
        index.search(nanq, 3)
    scores, got = index.search(queries, 3)
    ref_scores, ref = build_index(pool, ids, backend="faiss", device="cpu").search(queries, 3)
    assert got == ref and np.allclose(scores, ref_scores, atol=1e-6)  # same answer on finite input


def test_embed_actor_rejects_non_finite_rows():
    vectors = np.ones((3, 4), np.float32)
    vectors[1, 3] = np.nan
    vectors[2, 0] = np.inf
    meta = {"reject_field": np.array(["", "", "<json>"], object), "reject_reason": np.array(["", "", "x"], object)}
    assert reject_non_finite(vectors, meta) == 1
    assert list(meta["reject_field"]) == ["", "vector", "<json>"]
    assert meta["reject_reason"][1] == "embedding is not finite (1 of 4 values NaN or inf)"
    assert np.isfinite(vectors[:2]).all()


def test_factory_per_pool_size():
    assert min_train_vectors("IVF4,Flat") == 156 and min_train_vectors("IVF64,PQ8") == 39 * 256
    assert min_train_vectors("Flat") == 0 and min_train_vectors("HNSW32") == 0
    assert factory_for_pool("IVF4,Flat", 156) == ("IVF4,Flat", None)
    used, why = factory_for_pool("IVF64,Flat", 40)
    assert used == "Flat" and "40 training vectors < 39 x 64 = 2496" in why
    small = build_index(_unit(3), ["a", "b", "c"], factory="IVF4,Flat", nprobe=2, backend="faiss", device="cpu")
    assert small.factory == "Flat" and small.search(_unit(1), 3)[1][0] != ""
    big = build_index(_unit(200), [str(i) for i in range(200)], factory="IVF4,Flat", backend="faiss", device="cpu")
    assert big.factory == "IVF4,Flat" and big.is_trained
    direct = FaissIndex(8, factory="IVF4,Flat", device="cpu")
    with pytest.raises(ValueError, match=r"needs >= 156 training vectors, got 3"):  # not a C++ error
        direct.train(_unit(3))


def test_index_settings_checked_against_pool_sizes_before_embedding(cases):
    cfg = EvalConfig(data_root=str(cases / "base"), model="unused", out_dir="unused", index_factory="IVF4,Flat")
    sizes = pool_sizes(plan_tasks(cfg))
    assert sizes == {"mscoco_task0/local": 3, "mscoco_task3/local": 3, "global": 6}
    assert set(plan_indexes(cfg, sizes, 8).values()) == {"Flat"}
    bad = EvalConfig(data_root="x", model="x", out_dir="x", index_factory="IVF4,PQ3")  # 3 does not divide 8
    with pytest.raises(ConfigError, match=r"cannot index big/local \(1000000 candidates\)"):
        plan_indexes(bad, {"big/local": 1_000_000, "small/local": 3}, 8)
    torch_ivf = EvalConfig(data_root="x", model="x", out_dir="x", index_factory="IVF4,Flat", index_backend="torch")
    with pytest.raises(ConfigError, match="torch backend is exact search only"):
        plan_indexes(torch_ivf, {"big/local": 1_000_000}, 8)


# ---------------------------------------------------------------------------------------------
# Standard tools: pytrec_eval on our TREC run + qrels equals mbeir.json
# ---------------------------------------------------------------------------------------------


def _planted_dir(directory: Path, ids: list[str], vectors: np.ndarray, kind: str) -> Path:
    write_shard(directory / shard_name(0), ids, None, vectors)
    write_manifest(directory, {"kind": kind, "dim": int(vectors.shape[1]), "rows_out": len(ids), "complete": True})
    return directory


def test_pytrec_eval_parity(cases, tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    import faiss
    import pyarrow.parquet as pq

    root = cases / "base"
    dids = [f"9:{i}" for i in (0, 1, 2, 10, 11, 12)]
    pool = _unit(6, d=16, seed=3)
    qids = [*Q0_IDS, "9:100", "9:101", "9:102"]
    # Query i sits near candidate (i + 1) % 3 of its task: its positive lands at rank 2 or 3.
    near = [1, 2, 0, 4, 5, 3]
    q = pool[near] + 0.3 * _unit(6, d=16, seed=4)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    emb = EmbeddingSet(
        [_planted_dir(tmp_path / "q", qids, q, "query")], _planted_dir(tmp_path / "g", dids, pool, "candidate")
    )
    cfg = EvalConfig(data_root=str(root), model="unused", out_dir=str(tmp_path / "out"))
    rep = evaluate_stage(cfg, plan_tasks(cfg), emb)
    data = json.loads(Path(rep["paths"]["json"]).read_text())
    for task in ("mscoco_task0", "mscoco_task3"):
        qrels_file = root / catalogue.get_task(task).qrels_file
        qrels = {}
        for line in qrels_file.read_text().splitlines():
            qid, _, did, rel, _ = line.split()
            qrels.setdefault(qid, {})[did] = int(rel)
        for pool_name in ("local", "global"):
            run: dict[str, dict[str, float]] = {}
            for line in (tmp_path / "out" / "runs" / f"{task}.{pool_name}.trec").read_text().splitlines():
                qid, _, did, _, score, _ = line.split()
                run.setdefault(qid, {})[did] = float(score)
            for ranking in run.values():  # trec_eval sorts by score: ties would make it re-order
                assert len(set(ranking.values())) == len(ranking)
            ev = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10", "recip_rank"})
            per_q = ev.evaluate(run)
            ours = data["tasks"][task][pool_name]
            assert len(per_q) == ours["n_queries"] == 3
            for k in (1, 5, 10):
                want = np.mean([v[f"success_{k}"] for v in per_q.values()])
                assert ours["hits_at"][str(k)] == pytest.approx(want), (task, pool_name, k)
            assert ours["mrr"] == pytest.approx(np.mean([v["recip_rank"] for v in per_q.values()]))
            assert ours["hit"] == pytest.approx(np.mean([v["success_5"] for v in per_q.values()]))
    assert data["tasks"]["mscoco_task0"]["local"]["hits_at"]["1"] < 1.0  # the run is not trivial
    # Our parquet shards read in plain pyarrow, our .faiss file in plain faiss.
    table = pq.read_table(tmp_path / "g" / shard_name(0))
    assert table.column("id").to_pylist() == dids
    np.testing.assert_array_equal(np.stack(table.column("vector").to_numpy(zero_copy_only=False)), pool)
    assert read_embeddings(tmp_path / "g").ids.tolist() == dids
    plain = faiss.read_index(str(tmp_path / "out" / "index" / "global.faiss"))
    assert plain.ntotal == 6
    _, labels = plain.search(q[:1], 1)  # query 9:0; M-BEIR int labels decode to our ids
    first = (tmp_path / "out" / "runs" / "mscoco_task0.global.trec").read_text().split()
    assert first[:2] == ["9:0", "Q0"] and mbeir.int_to_did(int(labels[0, 0])) == first[2]


# ---------------------------------------------------------------------------------------------
# The real path: tiny model, Ray Data embedding, evaluation
# ---------------------------------------------------------------------------------------------


def _ray_cfg(root: Path, model: Path, out: Path, **kw) -> EvalConfig:
    base = dict(
        data_root=str(root),
        model=str(model),
        out_dir=str(out),
        embed=EmbedConfig(batch_size=8, actor_num_cpus=0.5, decode_num_cpus=0.25, use_gpu="false"),
        index_device="cpu",
        tasks=["mscoco_task0", "mscoco_task3"],
    )
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.ray
@pytest.mark.parametrize("case", ["bom", "cr_only"])
def test_evaluate_reads_all_rows_and_small_pools_fall_back(case, cases, ray_cluster, tiny_model_dir, tmp_path):
    """All 3 rows embedded and evaluated (main evaluated 2 of bom/, scored 0 on cr_only/); IVF4 on
    pools of 3 and 6 is exact search, recorded per pool, not a faiss error after embedding."""
    cfg = _ray_cfg(cases / case, Path(tiny_model_dir), tmp_path / "out", index_factory="IVF4,Flat")
    rep = run_evaluation(cfg)
    assert rep["rejected"] == [] and "rows_rejected=0" in rep["summary"]
    s = rep["tasks"]["mscoco_task0"]["settings"]
    assert s["n_queries_file"] == s["n_queries_embedded"] == 3
    for task in ("mscoco_task0", "mscoco_task3"):
        for pool in ("local", "global"):
            assert rep["results"][task][pool].n_queries == 3
            assert rep["tasks"][task]["settings"][pool]["index_factory"] == "Flat"
    manifest = json.loads((tmp_path / "out" / "embeddings" / "pool-global" / "manifest.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"]) == (6, 6)


@pytest.mark.ray
def test_id_newline_refused_before_embedding_and_rejected_by_embed(cases, ray_cluster, tiny_model_dir, tmp_path):
    from umarvel_ray.embed.run import run_embedding

    root = cases / "id_newline"
    with pytest.raises(InputError, match="mbeir_mscoco_task0_test.jsonl:2: field 'qid'"):
        run_evaluation(_ray_cfg(root, Path(tiny_model_dir), tmp_path / "out"))
    assert not (tmp_path / "out" / "embeddings").exists()
    res = run_embedding(
        EmbedConfig(
            input=Q0,
            kind="query",
            data_root=str(root),
            model=str(tiny_model_dir),
            output_dir=str(tmp_path / "emb"),
            actor_num_cpus=0.5,
            decode_num_cpus=0.25,
            use_gpu="false",
        )
    )
    assert (res.rows_in, res.rows_out, res.rows_rejected) == (3, 2, 1)
    (rej,) = jsonl.read_records(tmp_path / "emb" / "rejects.jsonl")
    assert mbeir.format_issue(rej["file"], rej["line"], rej["field"], rej["reason"]).endswith(ID_NEWLINE_ERROR)


def test_cases_cover_the_shared_script():
    assert CASES == ("base", "bom", "cr_only", "id_newline", "quotes_cr")
