"""Stage 6 (MM-Embed's continual text-to-text fine-tuning): the optional preset and the task filter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue, mbeir
from umarvel_ray.train.config import (
    DEFAULT_STAGES,
    STAGE_ORDER,
    TrainConfig,
    TrainJobConfig,
    resolve_stages,
    stage_config,
)
from umarvel_ray.train.data import MBEIRTrain, build_source, select_modalities


def test_stage6_is_optional_and_chains_after_stage5():
    assert STAGE_ORDER[-1] == "stage6" and "stage6" not in DEFAULT_STAGES
    job = TrainJobConfig(run_dir="/runs/x", model="base")
    assert [c.stage for c in resolve_stages(job)] == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    s6 = stage_config(job, "stage6")
    assert s6.model == "/runs/x/stage5/model"  # the final model of the chain
    assert (s6.data_kind, s6.objective, s6.modalities, s6.num_negatives) == ("mbeir", "infonce", ["text->text"], 5)
    assert s6.negatives_file == "/runs/x/negatives/negatives.jsonl" and s6.lr == 1.5e-5
    with_6 = TrainJobConfig(run_dir="/runs/x", model="base", stages=[*DEFAULT_STAGES, "stage6"], stage6={"lr": 1e-6})
    cfgs = resolve_stages(with_6)
    assert [c.stage for c in cfgs][-2:] == ["stage5", "stage6"] and cfgs[-1].lr == 1e-6


def test_modalities_are_checked():
    with pytest.raises(ConfigError, match=r"unknown \['text->txt'\]"):
        TrainConfig(modalities=["text->txt"])
    with pytest.raises(ConfigError, match="data_kind 'mbeir'"):
        TrainConfig(data_kind="nli", objective="infonce", modalities=["text->text"])
    assert TrainConfig(modalities=["text->text", "image,text->image"]).modalities == ["text->text", "image,text->image"]


def test_select_modalities_keeps_only_the_text_tasks(toy_mbeir_dir):
    from umarvel_ray.train.data import read_query_files

    rows = read_query_files(Path(toy_mbeir_dir) / mbeir.TRAIN_QUERY_FILE)
    text = select_modalities(rows, ["text->text"])
    assert {r["task_id"] for r in text} == {1} and len(text) == 200  # webqa_task1, 200 toy train queries
    assert all(r["qid"].startswith("2:") for r in text)  # WebQA is dataset 2
    assert text == [r for r in rows if r["task_id"] == 1]  # file order kept
    assert select_modalities(rows, []) is rows
    two = select_modalities(rows, ["text->text", "image->image"])
    assert {r["task_id"] for r in two} == {1, 4}
    with pytest.raises(ValueError, match="no training query left"):
        select_modalities([r for r in rows if r["task_id"] != 1], ["text->text"])


def test_stage6_source_trains_on_text_pairs_with_their_negatives(toy_mbeir_dir, tmp_path):
    root = Path(toy_mbeir_dir)
    rows = [json.loads(x) for x in (root / mbeir.TRAIN_QUERY_FILE).read_text().splitlines()]
    pool = [json.loads(x) for x in (root / mbeir.TRAIN_POOL_FILE).read_text().splitlines()]
    texts = [c["did"] for c in pool if c["modality"] == "text"][:50]
    negs = tmp_path / "negatives.jsonl"
    # negatives for every query; the text->text ones must be the only ones used
    negs.write_text("".join(json.dumps({"qid": r["qid"], "neg_dids": texts[:3]}) + "\n" for r in rows))
    job = TrainJobConfig(run_dir=str(tmp_path / "run"), data_root=str(root), model="base",
                         stage6={"negatives_file": str(negs), "num_negatives": 2})  # fmt: skip
    src = build_source(stage_config(job, "stage6"))
    assert isinstance(src, MBEIRTrain) and len(src) == 200
    assert all(catalogue.task_modalities(q["task_id"]) == ("text", "text") for q in src.queries)
    ex = src.example(0, 0)
    assert ex["query"]["image"] is None and ex["positive"]["image"] is None and ex["positive"]["text"]
    assert len(ex["negatives"]) == 2 and all(n["image"] is None for n in ex["negatives"])
    # stage 3/4 (no filter) see every task
    assert len(build_source(stage_config(job, "stage3"))) == len(rows)
