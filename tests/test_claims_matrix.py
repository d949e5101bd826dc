"""The claims matrix: every training switch the README, the presets and `--help` offer runs.

Embedder stages (jobs/train.py) and the re-ranker's training (jobs/train_reranker.py) alike.

Each cell is one 2-step training run on 2 gloo workers without Ray (the properties here do not
depend on Ray; Ray's own path is tests/test_train_ray.py). Cells combine several switches so that
every offered value is exercised at least once in a few runs; a cell's id names what it covers,
and `test_matrix_covers_every_offered_value` fails when an option is offered (in the code's own
lists of accepted values) but in no cell. Per cell: every rank exits 0, the DeepSpeed checkpoint
has the layout of its ZeRO stage (and bf16 mode when asked), the merged model records the
switches, its weights have the asked dtype and family, and its embeddings moved from the base's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from gloo_workers import EMBEDDER_LOOP, RERANKER_LOOP, check, run_workers
from probes import embed, probe_items

from umarvel_ray.layout import STEPS_FILE
from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
from umarvel_ray.model.embedder import EmbedderConfig
from umarvel_ray.model.inputs import FORMATS, InputConfig
from umarvel_ray.model.reranker import JUDGES
from umarvel_ray.train.config import OBJECTIVES, TrainConfig

pytestmark = pytest.mark.slow

# What the docs and help offer, per switch (the coverage test checks these against the code).
OFFERED: dict[str, tuple] = {
    "zero_stage": (0, 1, 2, 3),
    "cached_loss": ("off", "on"),
    "objective": OBJECTIVES,
    "attention": ("bidirectional", "causal"),
    "pooling": ("mean", "last"),
    "instruction": ("masked", "pooled"),
    "dtype": ("float32", "bfloat16"),
    "family": ("qwen2_vl", "qwen2_5_vl"),
    "input_format": FORMATS,
}


@dataclasses.dataclass(frozen=True)
class Cell:
    zero_stage: int
    cached_loss: str
    objective: str
    attention: str
    pooling: str
    instruction: str
    dtype: str
    family: str
    input_format: str

    @property
    def id(self) -> str:
        return "-".join(
            [
                f"zero{self.zero_stage}",
                "gradcache" if self.cached_loss == "on" else "nocache",
                self.objective,
                self.attention,
                self.pooling,
                f"instr_{self.instruction}",
                self.dtype,
                self.family,
                self.input_format,
            ]
        )


CELLS = [
    Cell(0, "off", "infonce", "bidirectional", "mean", "masked", "float32", "qwen2_vl", "umarvel"),
    Cell(1, "on", "symmetric", "causal", "last", "masked", "float32", "qwen2_5_vl", "mmembed"),
    Cell(2, "on", "infonce", "bidirectional", "mean", "pooled", "bfloat16", "qwen2_vl", "mmembed"),
    Cell(3, "on", "distill", "causal", "last", "pooled", "float32", "qwen2_5_vl", "umarvel"),
    Cell(3, "off", "symmetric", "bidirectional", "mean", "masked", "bfloat16", "qwen2_vl", "umarvel"),
]

# The data each objective trains on in the recipe (stage 1 text pairs with a hard negative,
# stage 2 caption -> image, stage 3 M-BEIR with instructions, stage 5 teacher lists).
DATA = {
    "infonce": dict(data_kind="mbeir", num_negatives=0),
    "symmetric": dict(data_kind="caption", train_file="pretrain/caption_pairs.jsonl", num_negatives=0),
    "distill": dict(data_kind="distill", num_candidates=4),
}


# Re-ranker training: (zero stage, judge, dtype); ZeRO 0 and 3 also in tests/test_zero3.py.
RERANKER_OFFERED: dict[str, tuple] = {
    "zero_stage": (0, 1, 2, 3),
    "judge": tuple(sorted(JUDGES)),
    "dtype": ("float32", "bfloat16"),
}
RERANKER_CELLS = [(1, "yes_no", "float32"), (2, "true_false", "bfloat16")]
RERANKER_ELSEWHERE = {"zero_stage": {0, 3}}  # test_zero3.py::test_zero3_reranker_merge_equals_zero0


def _reranker_id(cell: tuple[int, str, str]) -> str:
    return f"reranker-zero{cell[0]}-{cell[1]}-{cell[2]}"


def test_matrix_covers_every_offered_value():
    covered = {k: {getattr(c, k) for c in CELLS} for k in OFFERED}
    assert covered == {k: set(v) for k, v in OFFERED.items()}
    assert len({c.id for c in CELLS}) == len(CELLS)
    rr = {
        k: {c[i] for c in RERANKER_CELLS} | RERANKER_ELSEWHERE.get(k, set())
        for i, k in enumerate(RERANKER_OFFERED)
    }
    assert rr == {k: set(v) for k, v in RERANKER_OFFERED.items()}
    # the offered lists are the code's: anything else is refused
    for z in (-1, 4):
        with pytest.raises(ValueError, match="zero_stage"):
            TrainConfig(zero_stage=z)
    for key in ("attention", "pooling"):
        EmbedderConfig(**{key: OFFERED[key][1]})
        with pytest.raises(ValueError, match=key):
            EmbedderConfig(**{key: "other"})
    with pytest.raises(ValueError, match="format"):
        InputConfig(format="other")


@pytest.fixture(scope="module")
def tiny25_model_dir(tmp_path_factory):
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0, family="qwen2_5_vl")


def _teacher(data: Path, out: Path, n: int = 16) -> Path:
    """Teacher lists for the first n train queries: the positive first, then pool candidates."""
    rows = [json.loads(x) for x in (data / "query/train/mbeir_union_up_train.jsonl").read_text().splitlines()]
    pool = [
        json.loads(x)["did"]
        for x in (data / "cand_pool/global/mbeir_union_train_cand_pool.jsonl").read_text().splitlines()
    ]
    with open(out, "w") as f:
        for k, q in enumerate(rows[:n]):
            cands = [q["pos_cand_list"][0], *pool[3 * k : 3 * k + 3]]
            f.write(json.dumps({"qid": q["qid"], "candidates": cands, "scores": [0.9, 0.5, 0.3, 0.1]}) + "\n")
    return out


def _checkpoint_files(cell: Cell) -> set[str]:
    """DeepSpeed's files for one checkpoint of this cell on 2 ranks."""
    if cell.zero_stage == 0:
        return {"mp_rank_00_model_states.pt"}
    prefix = "bf16_" if cell.dtype == "bfloat16" else ""
    optim = {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    if cell.zero_stage == 3:
        return optim | {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    return optim | {"mp_rank_00_model_states.pt"}


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell_trains_and_merges(cell, tmp_path, tiny_model_dir, tiny25_model_dir, toy_mbeir_dir):
    from safetensors import safe_open

    base = tiny_model_dir if cell.family == "qwen2_vl" else tiny25_model_dir
    extra = dict(DATA[cell.objective])
    if cell.objective == "distill":
        extra["teacher_file"] = str(_teacher(toy_mbeir_dir, tmp_path / "teacher.jsonl"))
    cfg = TrainConfig(
        stage="matrix",
        run_dir=str(tmp_path / "run"),
        model=str(base),
        data_root=str(toy_mbeir_dir),
        objective=cell.objective,
        zero_stage=cell.zero_stage,
        micro_batch=2 if cell.cached_loss == "on" else 0,
        dtype=cell.dtype,
        embedder={
            "attention": cell.attention,
            "pooling": cell.pooling,
            "pool_instruction": cell.instruction == "pooled",
            "inputs": {"format": cell.input_format},
        },
        lora_r=4,
        lora_alpha=8,
        lr=2e-3,
        per_device_batch=4,
        max_examples=16,
        max_steps=2,
        save_every=2,
        log_every=1,
        learn_tau=True,
        **extra,
    )
    check(run_workers(EMBEDDER_LOOP, dataclasses.asdict(cfg)))

    steps = [json.loads(x) for x in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    assert summary["total_steps"] == 2 and summary["config"]["zero_stage"] == cell.zero_stage
    tag = cfg.stage_dir / "checkpoints" / "global_step2"
    assert {p.name for p in tag.glob("*.pt")} == _checkpoint_files(cell)

    out = cfg.model_dir
    meta = json.loads((out / "umarvel_embedder.json").read_text())["config"]
    assert (meta["attention"], meta["pooling"], meta["pool_instruction"], meta["dtype"]) == (
        cell.attention,
        cell.pooling,
        cell.instruction == "pooled",
        cell.dtype,
    )
    assert meta["inputs"]["format"] == cell.input_format
    assert json.loads((out / "config.json").read_text())["model_type"] == cell.family
    (shard,) = out.glob("*.safetensors")
    with safe_open(str(shard), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {f"torch.{cell.dtype}"}

    items = probe_items(toy_mbeir_dir)
    same = {k: meta[k] for k in ("attention", "pooling", "pool_instruction", "dtype", "inputs")}
    trained, untrained = embed(out, items), embed(base, items, same)
    assert trained.shape == (16, untrained.shape[1])
    assert np.allclose(np.linalg.norm(trained, axis=1), 1.0, atol=1e-3)
    assert float(np.abs(trained - untrained).max()) > 1e-3  # two steps moved the model


@pytest.mark.parametrize("cell", RERANKER_CELLS, ids=[_reranker_id(c) for c in RERANKER_CELLS])
def test_reranker_cell_trains_and_merges(cell, tmp_path, tiny_model_dir, toy_mbeir_dir):
    from test_reranker_train import _cfg, _write_negatives

    from umarvel_ray.data.images import load_image
    from umarvel_ray.model.reranker import Reranker
    from umarvel_ray.train.reranker import RerankPairs

    zero, judge, dtype = cell
    cfg = _cfg(
        tmp_path,
        toy_mbeir_dir,
        model=str(tiny_model_dir),
        judge=judge,
        dtype=dtype,
        zero_stage=zero,
        lora_r=4,
        lora_alpha=8,
        lr=2e-3,
        per_device_batch=4,
        max_examples=8,
        max_steps=2,
        save_every=2,
        log_every=1,
    )
    _write_negatives(toy_mbeir_dir, cfg.negatives_path())
    check(run_workers(RERANKER_LOOP, dataclasses.asdict(cfg)))

    steps = [json.loads(x) for x in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    prefix = "bf16_" if dtype == "bfloat16" else ""
    names = {p.name for p in (cfg.stage_dir / "checkpoints" / "global_step2").glob("*.pt")}
    assert {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    meta = json.loads((cfg.model_dir / "umarvel_reranker.json").read_text())["config"]
    assert (meta["judge"], meta["dtype"]) == (judge, dtype)

    def dec(item: dict) -> dict:
        return {**item, "image": load_image(toy_mbeir_dir, item["image"]) if item["image"] else None}

    pairs = RerankPairs(cfg)
    items = [(dec(q), dec(c)) for q, c, _ in (pairs.pair(i, 0) for i in range(4))]
    trained = Reranker.load(cfg.model_dir).score(items)
    base = Reranker.load(tiny_model_dir, cfg_overrides={"judge": judge, "dtype": dtype}).score(items)
    assert trained.shape == (4,) and np.all((trained >= 0) & (trained <= 1))
    assert float(np.abs(trained - base).max()) > 1e-4  # two steps moved the judge
