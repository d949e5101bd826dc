"""Stage-5 distillation teacher: top-k per task's local pool, scored cos + w * P(Yes).

    python jobs/teacher_scores.py --config jobs/configs/X.yaml data_root=... model=runs/r/stage4/model \
        reranker=runs/r/reranker/model output_dir=runs/r/teacher
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/teacher_scores.py --config ...

Options: fraction=0.1, top_k=50, default_weight=1.0, task_weights='{mscoco_task0: 0.5}',
reranker=null (teacher = cos only). Rerunning resumes: embedding shards and re-ranker shards
already finished are verified and skipped. Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import logging
import sys

from umarvel_ray.config import ConfigError, parse_job_args
from umarvel_ray.pipelines.teacher import TeacherConfig, run_teacher_scoring
from umarvel_ray.progress import setup_logging

log = logging.getLogger("umarvel_ray.jobs.teacher_scores")


def main(argv: list[str] | None = None) -> int:
    """Parse `--config FILE key=value ...`, run teacher scoring, return the exit code."""
    setup_logging()
    try:
        cfg = parse_job_args(TeacherConfig, argv, description=__doc__ or "", section="teacher")
        result = run_teacher_scoring(cfg)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    print(result.summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
