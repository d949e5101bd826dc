"""Train the U-MARVEL re-ranker (pointwise Yes/No judge, LoRA on Qwen2-VL) with Ray Train + DeepSpeed.

    python jobs/train_reranker.py --config recipe.yaml max_steps=50
    python jobs/train_reranker.py model=runs/toy/base_model run_dir=runs/toy data_root=data/toy_mbeir
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_reranker.py --config recipe.yaml

The YAML's `reranker:` section is used when present (else the whole file must hold reranker keys;
`--help` lists them). Needs the stage-3 model's mined negatives (jobs/mine_negatives.py). The merged judge goes to `<output>/model` (default
`<run_dir>/reranker/model`); a finished run is skipped, an interrupted one resumes from its last
checkpoint when submitted again with the same run_dir. Exit codes: 0 done, 2 bad config, 1 failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from umarvel_ray.cli import run_job
from umarvel_ray.progress import summary


def _train(cfg: object) -> Path:
    from umarvel_ray.train.launch import run_reranker_training

    out = run_reranker_training(cfg)
    summary("train reranker", model_dir=str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.train.reranker import RerankerTrainConfig, check_reranker_inputs

    return run_job(
        RerankerTrainConfig, _train, argv, __doc__, "reranker", needs_ray=True, check=check_reranker_inputs
    )


if __name__ == "__main__":
    sys.exit(main())
