"""Mining with pool=local: every negative comes from the query's own task's local pool (same dataset,
the task's candidate modality), exactly the best-scoring non-positives there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_mine import (  # the 48-query / ~130-candidate subset, shared pool embeddings
    EMBED,
    make_shared_inputs,
)

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue, mbeir
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.mine.config import MineConfig, validate_config
from umarvel_ray.mine.run import run_mining


def _jsonl(path: Path, key: str) -> dict[str, dict]:
    return {r[key]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def test_pool_option_is_checked(toy_mbeir_dir, tmp_path):
    ok = {"data_root": str(toy_mbeir_dir), "output_dir": str(tmp_path)}
    validate_config(MineConfig(**ok, pool="local"))
    with pytest.raises(ConfigError, match="pool must be one of"):
        validate_config(MineConfig(**ok, pool="global"))
    with pytest.raises(ConfigError, match="local with strategy=umarvel"):
        validate_config(MineConfig(**ok, pool="local", strategy="mmembed", depth=50))


@pytest.mark.ray
@pytest.mark.slow
def test_local_pool_negatives_are_same_task_same_modality(ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path_factory):
    from umarvel_ray.store import read_embeddings

    base = tmp_path_factory.getbasetemp() / "mine_teacher_shared"  # as tests/test_mine.py: embedded once
    qpath, ppath = make_shared_inputs(Path(toy_mbeir_dir), base)
    out = tmp_path_factory.mktemp("mine_local")
    queries = _jsonl(qpath, "qid")
    pool = _jsonl(ppath, "did")

    def run(name: str, pool_kind: str):
        return run_mining(
            MineConfig(
                data_root=str(toy_mbeir_dir),
                model=str(tiny_model_dir),
                output_dir=str(out / name),
                query_file=str(qpath),
                pool_file=str(ppath),
                pool_embeddings=str(base / "pool_emb_tiny"),
                query_embeddings=str(out / "q_emb"),
                depth=20,
                num_negatives=3,
                pool=pool_kind,
                embed=EmbedConfig(**EMBED),
            )
        )

    local = run("local", "local")
    recs = _jsonl(local.negatives_path, "qid")
    c = local.counts
    assert c["queries_mined"] == len(queries) == 48 and c["queries_written"] + c["no_negatives"] == 48
    assert json.loads((out / "local" / "summary.json").read_text())["pool"] == "local"

    # exact ids: the first 3 non-positives of the query's local pool by a numpy dot product
    q_emb, p_emb = read_embeddings(out / "q_emb"), read_embeddings(base / "pool_emb_tiny")
    qrow = {q: i for i, q in enumerate(q_emb.ids.tolist())}
    pids = p_emb.ids.tolist()
    checked = 0
    for qid, q in queries.items():
        ds, cand_mod = mbeir.split_id(qid)[0], catalogue.task_modalities(q["task_id"])[1]
        local_ids = [
            d for d in pids if mbeir.split_id(d)[0] == ds and pool[d]["modality"] == cand_mod
        ]
        pos = set(q["pos_cand_list"])
        eligible = [d for d in local_ids if d not in pos]
        if not eligible:
            assert qid not in recs
            continue
        negs = recs[qid]["neg_dids"]
        for d in negs:  # never another dataset's or another modality's candidate
            assert mbeir.split_id(d)[0] == ds and pool[d]["modality"] == cand_mod and d not in pos
        sims = p_emb.vectors @ q_emb.vectors[qrow[qid]]
        s = dict(zip(pids, sims.tolist(), strict=True))
        best = sorted(eligible, key=lambda d: -s[d])[:3]
        if len(eligible) >= 3 and s[best[2]] - max([s[d] for d in eligible if d not in best], default=-9) > 1e-5:
            assert negs == best
            checked += 1
    assert checked >= 30

    # the same queries mined over the union pool do pick other datasets / modalities: the property
    # above is not vacuous on this subset
    union = _jsonl(run("union", "union").negatives_path, "qid")
    foreign = sum(
        1
        for qid, r in union.items()
        for d in r["neg_dids"]
        if mbeir.split_id(d)[0] != mbeir.split_id(qid)[0]
        or pool[d]["modality"] != catalogue.task_modalities(queries[qid]["task_id"])[1]
    )
    assert foreign > 0
