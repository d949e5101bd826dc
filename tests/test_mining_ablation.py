"""Mining compared (`jobs/bench_mining.py`): config from the recipe file, the table, and one tiny
end-to-end comparison (2 variants: mine -> stage 4 -> evaluate, each from the same start model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel_ray.ablation.mining import (
    DEFAULT_VARIANTS,
    MiningAblationConfig,
    load_ablation_config,
    rule_text,
    run_mining_ablation,
    table_markdown,
    variant_mine_config,
    variant_train_job,
)
from umarvel_ray.config import ConfigError
from umarvel_ray.data import mbeir
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.eval.plan import EvalConfig
from umarvel_ray.layout import RunLayout
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.train.config import TrainJobConfig, stage_config

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "jobs/configs/toy.yaml"


def test_recipe_file_sections_drive_every_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_ablation_config(TOY, ["only=[margin,umarvel]", "variants.margin.margin=0.1"])
    assert cfg.model == str(tmp_path / "runs/toy/stage3/model")  # '' = the recipe run's stage-3 model
    assert cfg.out == tmp_path / "runs/toy/mining_ablation"
    assert cfg.names() == ["margin", "umarvel"] and set(cfg.variants) == set(DEFAULT_VARIANTS)
    lay = RunLayout(cfg.out / "margin")
    mine = variant_mine_config(cfg, "margin", lay)
    # the recipe's mine section (depth 50, 3 negatives) + the variant's override, shared embeddings
    assert (mine.strategy, mine.margin, mine.max_score, mine.depth, mine.num_negatives) == ("umarvel", 0.1, None, 50, 3)
    assert mine.model == cfg.model and mine.output_dir == str(lay.negatives_dir())
    assert mine.query_embeddings == str(cfg.out / "embeddings/queries")
    assert mine.pool_embeddings == str(cfg.out / "embeddings/pool")
    assert variant_mine_config(cfg, "mmembed", RunLayout(cfg.out / "mmembed")).strategy == "mmembed"
    # stage 4 with the recipe's settings, from the stage-3 model, on this variant's negatives
    s4 = stage_config(variant_train_job(cfg, lay), "stage4")
    assert s4.model == cfg.model and s4.negatives_file == str(lay.negatives_file())
    assert (s4.max_steps, s4.lr, s4.per_device_batch, s4.num_negatives, s4.lora_r) == (100, 2e-4, 16, 3, 32)
    assert s4.stage_dir == cfg.out / "margin" / "stage4" and s4.seed == 42
    assert s4.holdout_fraction == cfg.holdout_fraction
    held = load_ablation_config(TOY, ["holdout_fraction=0.1"])
    assert stage_config(variant_train_job(held, lay), "stage4").holdout_fraction == 0.1
    assert cfg.eval.embed.instruction_seed == 0 and cfg.eval.data_root == str(tmp_path / "data/toy_mbeir")


def test_bad_variant_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown variant"):
        load_ablation_config(TOY, ["only=[nope]"])
    with pytest.raises(ConfigError, match="usable name"):
        MiningAblationConfig(variants={"stage3": {}})
    with pytest.raises(ConfigError, match="unknown key"):
        variant_mine_config(
            MiningAblationConfig(variants={"x": {"marginn": 0.1}}, run_dir=str(tmp_path)), "x", RunLayout(tmp_path)
        )


def test_a_variant_mined_with_other_settings_is_not_reused(tmp_path, monkeypatch):
    from umarvel_ray.ablation.mining import _mine

    monkeypatch.chdir(tmp_path)
    cfg = load_ablation_config(TOY, ["variants.margin.margin=0.01"])
    lay = RunLayout(cfg.out / "margin")
    lay.negatives_dir().mkdir(parents=True)
    lay.negatives_file().write_text("")
    done = {"strategy": "umarvel", "pool": "union", "depth": 50, "num_negatives": 3, "max_score": None, "margin": 0.01}
    (lay.negatives_dir() / "summary.json").write_text(json.dumps({**done, "counts": {"full": 7}}))
    assert _mine(cfg, "margin", lay) == {"full": 7}  # same rule: read back, not mined again
    (lay.negatives_dir() / "summary.json").write_text(json.dumps({**done, "margin": 0.05, "counts": {}}))
    with pytest.raises(ConfigError, match=r"mined with other settings \(margin=0.05\)"):
        _mine(cfg, "margin", lay)


def test_table_rows():
    rows = [
        {"variant": "stage3", "rule": "ref", "mine": None, "local": 0.409, "global": 0.275},
        {
            "variant": "margin",
            "rule": rule_text({"strategy": "umarvel", "margin": 0.05}),
            "mine": dict(full=10, padded=2, no_negatives=3, filtered_max_score=0, queries_filtered_max_score=0,
                         filtered_margin=40, queries_filtered_margin=9),
            "local": 0.4125,
            "global": None,
        },
    ]  # fmt: skip
    lines = table_markdown(rows).splitlines()
    assert lines[2] == "| stage3 | ref | - | - | 40.9 | 27.5 |"
    assert lines[3] == "| margin | umarvel, margin=0.05 | 10 / 2 / 3 | max_score 0 (0), margin 40 (9) | 41.2 | - |"


def _small_inputs(toy: Path, out: Path, n_queries: int = 24, n_pool: int = 120) -> tuple[Path, Path]:
    """The first queries of the union train file and a pool of their positives + the first candidates."""
    out.mkdir(parents=True, exist_ok=True)
    qlines = (toy / mbeir.TRAIN_QUERY_FILE).read_text().splitlines(keepends=True)[:n_queries]
    wanted = {d for line in qlines for d in json.loads(line)["pos_cand_list"]}
    plines = [
        line
        for i, line in enumerate((toy / mbeir.TRAIN_POOL_FILE).read_text().splitlines(keepends=True))
        if i < n_pool or json.loads(line)["did"] in wanted
    ]
    (out / "q.jsonl").write_text("".join(qlines))
    (out / "p.jsonl").write_text("".join(plines))
    return out / "q.jsonl", out / "p.jsonl"


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.ray
def test_two_variants_train_from_the_same_model_and_make_one_table(
    ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path
):
    import torch

    toy = Path(toy_mbeir_dir)
    q, p = _small_inputs(toy, tmp_path / "inputs")
    embed = EmbedConfig(batch_size=16, actor_num_cpus=0.5, decode_num_cpus=0.25, chunk_rows=64)
    stage = dict(lora_r=4, lora_alpha=8, per_device_batch=4, max_steps=2, num_negatives=2, workers=2,
                 cpus_per_worker=0.5, save_every=2, log_every=1, max_failures=0, lr=1e-3)  # fmt: skip
    cfg = MiningAblationConfig(
        run_dir=str(tmp_path / "run"),
        data_root=str(toy),
        stage3_model=str(tiny_model_dir),
        out_dir=str(tmp_path / "abl"),
        variants={"umarvel": {"strategy": "umarvel"}, "mmembed": {"strategy": "mmembed", "seed": 3}},
        train=TrainJobConfig(run_dir=str(tmp_path / "run"), data_root=str(toy), stage4=stage),
        mine=MineConfig(data_root=str(toy), query_file=str(q), pool_file=str(p), depth=50, num_negatives=2,
                        embed=embed),
        eval=EvalConfig(data_root=str(toy), tasks=["webqa_task1"], pools=["local"], embed=embed, index_device="cpu"),
    )  # fmt: skip
    result = run_mining_ablation(cfg)
    out = tmp_path / "abl"
    assert [r["variant"] for r in result["rows"]] == ["stage3", "umarvel", "mmembed"]
    assert all(r["local"] is not None and r["global"] is None for r in result["rows"])
    md = (out / "mining_ablation.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in md[2:]] == ["| stage3", "| umarvel", "| mmembed"]
    assert json.loads((out / "mining_ablation.json").read_text())["rows"] == result["rows"]
    assert (out / "ablation_config.yaml").is_file()
    # one embedding pass shared by both variants; each variant mined all 24 queries
    assert sorted(x.name for x in (out / "embeddings").iterdir()) == ["pool", "queries"]
    for r in result["rows"][1:]:
        m = r["mine"]
        assert m["full"] + m["padded"] + m["no_negatives"] == 24 and m["queries_written"] > 0
    assert result["rows"][1]["mine"]["c1"] == 0 and result["rows"][2]["mine"]["c1"] + result["rows"][2]["mine"]["c2"] > 0
    # different negatives -> different stage-4 models, both trained from the same start model
    negs = [(out / v / "negatives" / "negatives.jsonl").read_text() for v in ("umarvel", "mmembed")]
    assert negs[0] != negs[1]
    w_u, w_m = (_weights(out / v / "stage4" / "model") for v in ("umarvel", "mmembed"))
    w_0 = _weights(Path(tiny_model_dir))
    lm = [k for k in w_0 if k.endswith("layers.0.self_attn.q_proj.weight") and "visual" not in k]
    assert lm and not torch.equal(w_u[lm[0]], w_m[lm[0]])
    assert not torch.equal(w_u[lm[0]], w_0[lm[0]]) and not torch.equal(w_m[lm[0]], w_0[lm[0]])
    for v in ("umarvel", "mmembed"):
        s = json.loads((out / v / "stage4" / "train_summary.json").read_text())
        assert s["total_steps"] == 2
    # a second call finds every step done: nothing is mined, trained or evaluated again
    mtimes = {v: (out / v / "stage4" / "model" / "config.json").stat().st_mtime_ns for v in ("umarvel", "mmembed")}
    again = run_mining_ablation(cfg)
    assert again["rows"] == result["rows"]
    assert mtimes == {v: (out / v / "stage4" / "model" / "config.json").stat().st_mtime_ns for v in mtimes}
