"""Train the U-MARVEL chain (or one stage) with Ray Train + DeepSpeed.

    python jobs/train.py --config jobs/configs/toy.yaml                      # all stages in order
    python jobs/train.py --config jobs/configs/toy.yaml --stage stage3 stage3.max_steps=50
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/paper_qwen2vl7b.yaml --stage stage1

Overrides: `common.key=value` (every stage) or `stageN.key=value`; `--help` lists the job keys and
`--help-stage` the per-stage TrainConfig keys. Finished stages are skipped; an interrupted stage
resumes from its last checkpoint when submitted again with the same run_dir.
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys

from umarvel_ray.config import ConfigError, help_lines, parse_job_args
from umarvel_ray.progress import setup_logging, summary

log = logging.getLogger("umarvel_ray.jobs.train")


def main(argv: list[str] | None = None) -> int:
    """Parse `--config FILE [--stage NAME] key=value ...`, run the stages, return the exit code."""
    from umarvel_ray.train.config import TrainConfig, TrainJobConfig, check_start_model, resolve_stages
    from umarvel_ray.train.inputs import check_between_stage_files, check_stage_inputs

    setup_logging()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --help is not --help-stage
    pre.add_argument("--stage", default=None, help="run only this stage (stage1..stage5)")
    pre.add_argument("--help-stage", action="store_true", help="list the per-stage TrainConfig keys")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.help_stage:
        print("per-stage keys (common.KEY=... or stageN.KEY=...):\n" + "\n".join(help_lines(TrainConfig)))
        return 0
    try:
        job = parse_job_args(TrainJobConfig, rest, description=__doc__ or "", section="train")
        stages = resolve_stages(job, known.stage)
        if stages:
            check_start_model(stages[0])  # later stages start from what the earlier ones write
        for cfg in stages:
            check_stage_inputs(cfg)  # e.g. stage1 without pretrain/nli_pairs.jsonl: say what to do
            check_between_stage_files(cfg)  # stage4/5 without mined negatives / teacher scores
    except (ConfigError, ValueError) as exc:
        log.error("bad config: %s", exc)
        return 2
    try:
        from umarvel_ray.runtime import ensure_ray
        from umarvel_ray.train.launch import run_stage

        ensure_ray()
        for cfg in stages:
            out = run_stage(cfg)
            summary(f"train {cfg.stage}", model_dir=str(out))
    except Exception:
        log.exception("training failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
