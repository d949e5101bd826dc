"""Stage-5 distillation teacher: top-k per task's local pool, scored cos + w * P(Yes).

    python jobs/teacher_scores.py --config jobs/configs/X.yaml data_root=... model=runs/r/stage4/model \
        reranker=runs/r/reranker/model output_dir=runs/r/teacher
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/teacher_scores.py --config ...

Options: fraction=0.1, top_k=50, default_weight=1.0, task_weights='{mscoco_task0: 0.5}',
reranker=null (teacher = cos only). Rerunning resumes: embedding shards and re-ranker shards
already finished are verified and skipped. Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.teacher.run import run_teacher_scoring


def main(argv: list[str] | None = None) -> int:
    return run_job(
        TeacherConfig,
        lambda cfg: print(run_teacher_scoring(cfg).summary, flush=True),
        argv,
        __doc__,
        "teacher",
    )


if __name__ == "__main__":
    sys.exit(main())
