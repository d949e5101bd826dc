"""Hard-negative mining compared (`jobs/bench_mining.py`): one stage-3 model, one stage 4 per rule.

For each variant (a named set of `MineConfig` overrides; by default U-MARVEL's first-N walk,
MM-Embed's modality-aware C1/C2 sampling, the `max_score` filter and NV-Retriever's positive-aware
`margin` filter, docs/RECIPE.md sections 3-4 and mine/select.py):

1. mine negatives with the stage-3 model (the query and pool embeddings are made once and shared
   by every variant: they depend on the model only),
2. train stage 4 from that same stage-3 model with the same stage-4 settings and seed,
3. evaluate the stage-4 model on M-BEIR (local and global pools),

and the stage-3 model itself is evaluated once as the reference row. Every variant is a run
directory of its own (`RunLayout(<out_dir>/<variant>)`: negatives/, stage4/, eval/stage4/), and
every step is skipped when its output is there, so `only=[name]` runs one variant at a time and a
last call without `only` writes the whole table. Outputs in out_dir: `mining_ablation.{md,json}`,
`ablation_config.yaml` (the resolved config), `embeddings/`, `eval/stage3/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from umarvel_ray.config import (
    ConfigError,
    check_model_dir,
    from_dict,
    load_config,
    option,
    require_absolute,
    save_config,
    to_dict,
)
from umarvel_ray.eval.plan import EvalConfig
from umarvel_ray.io import atomic_write_text
from umarvel_ray.layout import RunLayout
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.train.config import TrainJobConfig

log = logging.getLogger("umarvel_ray.ablation.mining")

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "umarvel": {"strategy": "umarvel"},
    "mmembed": {"strategy": "mmembed"},
    "max_score": {"strategy": "umarvel", "max_score": 0.7},
    "margin": {"strategy": "umarvel", "margin": 0.05},
}
REFERENCE = "stage3"
# the mining settings summary.json records: a variant directory mined with others is not reused
RULE_KEYS = ("strategy", "pool", "depth", "num_negatives", "max_score", "margin")
TABLE_NAME = "mining_ablation"
CONFIG_NAME = "ablation_config.yaml"
MINE_STATS = (
    "queries_written", "full", "padded", "no_negatives", "filtered_max_score",
    "queries_filtered_max_score", "filtered_margin", "queries_filtered_margin", "c1", "c2",
)  # fmt: skip


@dataclasses.dataclass
class MiningAblationConfig:
    """`jobs/bench_mining.py` config. The `train`, `mine` and `eval` sections are the recipe file's
    (jobs/configs/toy.yaml): stage 4 trains with `train.common` + `train.stage4`, mining with `mine`
    plus each variant's overrides, evaluation with `eval`."""

    run_dir: str = option("runs/default", "the recipe run whose stage-3 model is compared", path="cwd")
    data_root: str = option("", "M-BEIR directory (the recipe's data_root)", path="cwd")
    stage3_model: str = option("", "the model every variant mines with and trains stage 4 from; '' = "
                               "<run_dir>/stage3/model", path="model")  # fmt: skip
    out_dir: str = option("", "where the variants' run directories and the table go; '' = "
                          "<run_dir>/mining_ablation", path="cwd")  # fmt: skip
    variants: dict = option(DEFAULT_VARIANTS, "variant name -> MineConfig overrides (strategy, max_score, margin, ...)")
    only: list[str] = option([], "run only these variants, in this order ([] = all of variants)")
    reference: bool = option(True, "evaluate the stage-3 model too (the table's reference row)")
    holdout_fraction: float = option(0.0, "the recipe file's: train queries stage 4 leaves out (data/holdout.py)")
    train: TrainJobConfig = dataclasses.field(default_factory=TrainJobConfig)
    mine: MineConfig = dataclasses.field(default_factory=MineConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        unknown = [n for n in self.only if n not in self.variants]
        if unknown:
            raise ConfigError(f"only: unknown variant(s) {unknown}; variants: {list(self.variants)}")
        for name, overrides in self.variants.items():
            if name == REFERENCE or "/" in name or not name:
                raise ConfigError(f"variants: {name!r} is not a usable name (nor {REFERENCE!r})")
            if not isinstance(overrides, dict):
                raise ConfigError(f"variants.{name}: expected a mapping of MineConfig keys, got {overrides!r}")

    @property
    def model(self) -> str:
        return self.stage3_model or str(RunLayout(self.run_dir).stage_model("stage3"))

    @property
    def out(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.run_dir) / TABLE_NAME

    def names(self) -> list[str]:
        return list(self.only) if self.only else list(self.variants)


def load_ablation_config(path: str | Path | None, overrides: list[str] | None = None) -> MiningAblationConfig:
    """The config from a recipe file (its other top-level keys, such as `reranker` or `steps`, are
    ignored and named in the log) and `key=value` overrides; paths made absolute (`load_config`)."""
    loaded: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    names = {f.name for f in dataclasses.fields(MiningAblationConfig)}
    ignored = sorted(set(loaded) - names)
    if ignored:
        log.info("%s: ignoring keys this job does not use: %s", path, ignored)
    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(tmp) / "config.yaml"
        kept.write_text(yaml.safe_dump({k: v for k, v in loaded.items() if k in names}))
        return load_config(MiningAblationConfig, kept, overrides)


def variant_mine_config(cfg: MiningAblationConfig, name: str, layout: RunLayout) -> MineConfig:
    """`cfg.mine` + the variant's overrides, on the stage-3 model, writing to the variant's
    negatives/ and reading the shared embeddings under out_dir/embeddings (unless set)."""
    from umarvel_ray.config import resolve_paths

    data = to_dict(cfg.mine)
    data.update(cfg.variants[name])
    data.update(data_root=cfg.data_root, model=cfg.model, output_dir=str(layout.negatives_dir()))
    data["embed"]["data_root"] = data["embed"].get("data_root") or cfg.data_root  # its relative paths' anchor
    shared = cfg.out / "embeddings"
    data["query_embeddings"] = cfg.mine.query_embeddings or str(shared / "queries")
    data["pool_embeddings"] = cfg.mine.pool_embeddings or str(shared / "pool")
    return resolve_paths(from_dict(MineConfig, data, f"variants.{name}"))


def variant_train_job(cfg: MiningAblationConfig, layout: RunLayout) -> TrainJobConfig:
    """Stage 4 alone, from the stage-3 model, on the variant's negatives, in the variant's run dir,
    leaving out the held-out train queries as the recipe's stage 4 does."""
    stage4 = {**cfg.train.stage4, "negatives_file": str(layout.negatives_file()), "model": cfg.model}
    common = {"holdout_fraction": cfg.holdout_fraction, **cfg.train.common}  # as the recipe's train_job
    return dataclasses.replace(
        cfg.train,
        run_dir=str(layout.run_dir),
        data_root=cfg.data_root,
        model=cfg.model,
        stages=["stage4"],
        common=common,
        stage4=stage4,
    )


def _mine(cfg: MiningAblationConfig, name: str, layout: RunLayout) -> dict[str, Any]:
    """Mining counts of one variant (summary.json's), mining first unless its negatives exist."""
    from umarvel_ray.embed.train_pool import SUMMARY_NAME

    summary_path = layout.negatives_dir() / SUMMARY_NAME
    mcfg = variant_mine_config(cfg, name, layout)
    if not (layout.negatives_file().is_file() and summary_path.is_file()):
        from umarvel_ray.mine.run import run_mining

        run_mining(mcfg)
    else:
        log.info("%s: negatives exist (%s), not mined again", name, layout.negatives_file())
    done = json.loads(summary_path.read_text())
    changed = [k for k in RULE_KEYS if done.get(k) != getattr(mcfg, k)]
    if changed:
        was = ", ".join(f"{k}={done.get(k)}" for k in changed)
        raise ConfigError(
            f"variant {name}: {layout.run_dir} was mined with other settings ({was}); name the variant "
            "differently, or remove that directory to redo it"
        )
    return done["counts"]


def _train(cfg: MiningAblationConfig, layout: RunLayout) -> Path:
    from umarvel_ray.train.config import stage_config
    from umarvel_ray.train.launch import run_stage

    return run_stage(stage_config(variant_train_job(cfg, layout), "stage4"))


def _evaluate(cfg: MiningAblationConfig, model: str, out: Path) -> dict[str, Any]:
    """The M-BEIR report of `model` in `out` (read back when it exists for that same model)."""
    report_path = out / "mbeir.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("settings", {}).get("model") == model:
            log.info("evaluation of %s exists (%s), not run again", model, report_path)
            return report
    from umarvel_ray.eval.evaluate import run_evaluation

    ecfg = dataclasses.replace(cfg.eval, data_root=cfg.data_root, model=model, out_dir=str(out))
    return run_evaluation(ecfg)


def _average(report: dict[str, Any], pool: str) -> float | None:
    avg = report.get("averages", {}).get(pool)
    value = avg.get("value") if isinstance(avg, dict) else avg
    return None if value is None else float(value)


def rule_text(overrides: dict[str, Any]) -> str:
    """A variant's rule in words: 'umarvel', 'umarvel, margin=0.05', 'mmembed, c2_ranks=[46, 50]'."""
    extra = [f"{k}={v}" for k, v in overrides.items() if k != "strategy"]
    return ", ".join([str(overrides.get("strategy", "umarvel")), *extra])


def variant_row(cfg: MiningAblationConfig, name: str) -> dict[str, Any]:
    """Mine, train stage 4 and evaluate one variant (each skipped when done); its table row."""
    layout = RunLayout(cfg.out / name)
    counts = _mine(cfg, name, layout)
    model = _train(cfg, layout)
    report = _evaluate(cfg, str(model), layout.eval_dir("stage4"))
    return {
        "variant": name,
        "rule": rule_text(cfg.variants[name]),
        "mine": {k: counts.get(k, 0) for k in MINE_STATS},
        "local": _average(report, "local"),
        "global": _average(report, "global"),
        "model": str(model),
        "report": str(layout.eval_dir("stage4") / "mbeir.json"),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table: negatives statistics and M-BEIR averages (percent) per variant."""
    lines = [
        "| variant | rule | queries with negatives: full / padded / none | dropped as likely false "
        "negatives: candidates (queries) | local avg | global avg |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("mine")
        if m is None:
            stats = dropped = "-"
        else:
            stats = f"{m['full']} / {m['padded']} / {m['no_negatives']}"
            dropped = (
                f"max_score {m['filtered_max_score']} ({m['queries_filtered_max_score']}), "
                f"margin {m['filtered_margin']} ({m['queries_filtered_margin']})"
            )
        lines.append(f"| {r['variant']} | {r['rule']} | {stats} | {dropped} | {_pct(r['local'])} | {_pct(r['global'])} |")
    return "\n".join(lines) + "\n"


def run_mining_ablation(cfg: MiningAblationConfig) -> dict[str, Any]:
    """Run the comparison (see the module docstring); returns the table as a dict and writes it."""
    from umarvel_ray.progress import summary

    require_absolute(cfg)
    check_model_dir(cfg.model, "stage3_model")
    out = cfg.out
    save_config(cfg, out, CONFIG_NAME)
    rows: list[dict[str, Any]] = []
    if cfg.reference:
        report = _evaluate(cfg, cfg.model, RunLayout(out).eval_dir(REFERENCE))
        rows.append(
            {"variant": REFERENCE, "rule": "(no stage 4: the model every variant starts from)", "mine": None,
             "local": _average(report, "local"), "global": _average(report, "global"), "model": cfg.model,
             "report": str(RunLayout(out).eval_dir(REFERENCE) / "mbeir.json")}
        )  # fmt: skip
    for name in cfg.names():
        log.info("=== variant %s: %s", name, rule_text(cfg.variants[name]))
        rows.append(variant_row(cfg, name))
    result = {"stage3_model": cfg.model, "out_dir": str(out), "rows": rows}
    atomic_write_text(out / f"{TABLE_NAME}.json", json.dumps(result, indent=2))
    table = table_markdown(rows)
    atomic_write_text(out / f"{TABLE_NAME}.md", table)
    print(table, flush=True)
    result["summary"] = summary(
        "bench_mining",
        variants=len(rows) - int(cfg.reference),
        output=str(out / f"{TABLE_NAME}.md"),
        **{f"{r['variant']}_local": _pct(r["local"]) for r in rows},
        **{f"{r['variant']}_global": _pct(r["global"]) for r in rows},
    )
    return result
