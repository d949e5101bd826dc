"""Hard-negative mining compared: from one stage-3 model, mine with each rule, train stage 4, evaluate.

    python jobs/bench_mining.py --config jobs/configs/toy.yaml                  # every variant
    python jobs/bench_mining.py --config jobs/configs/toy.yaml only=[margin] \
        stage3_model=runs/toy/stage3/model out_dir=runs/toy/mining_ablation variants.margin.margin=0.1

Reads the recipe file's `train` (common + stage4), `mine` and `eval` sections and run_dir/data_root;
its other keys are ignored. Variants (`variants.NAME.KEY=value`, MineConfig keys): umarvel (first-N
walk), mmembed (C1/C2), max_score (score filter), margin (positive-aware margin). Each variant is a
run directory under out_dir; finished steps are skipped, so `only=[NAME]` runs one variant at a time
and a last call without `only` writes the whole table (out_dir/mining_ablation.{md,json}).
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys

from umarvel_ray.config import ConfigError, help_lines
from umarvel_ray.progress import setup_logging

log = logging.getLogger("umarvel_ray.jobs.bench_mining")


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.ablation.mining import MiningAblationConfig, load_ablation_config, run_mining_ablation

    setup_logging()
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key=value):\n" + "\n".join(help_lines(MiningAblationConfig)),
    )
    parser.add_argument("--config", default=None, help="recipe YAML (jobs/configs/toy.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_ablation_config(args.config, args.overrides)
    except (ConfigError, ValueError) as exc:
        log.error("bad config: %s", exc)
        return 2
    try:
        from umarvel_ray.runtime import ensure_ray

        ensure_ray()
        run_mining_ablation(cfg)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    except Exception:
        log.exception("bench_mining failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
