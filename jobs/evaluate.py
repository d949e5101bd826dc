"""Evaluate an embedder on M-BEIR (16 tasks, local and global pools) or on the toy benchmark.

    python jobs/evaluate.py data_root=/data/M-BEIR model=runs/stage3/merged out_dir=runs/eval
    python jobs/evaluate.py data_root=data/toy_mbeir model=runs/toy/stage3/model out_dir=runs/toy-eval \\
        tasks=[mscoco_task0,cirr_task7] \\
        pools=[local] embed.prompt_index=0 embed.use_gpu=false
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --config CFG ...
    python jobs/evaluate.py --config jobs/configs/toy.yaml model=runs/toy/stage5/model out_dir=runs/toy/eval/plus \
        rerank=umarvel+ rerank_model=runs/toy/reranker/model rerank_top_k=20 rerank_weight=0.1
    python jobs/evaluate.py ... rerank=zeroshot rerank_model=runs/toy/base_model rerank_top_k=20

Embeds the queries and the global union pool once (Ray Data), cuts each task's local index out of
the global embeddings, searches exactly (faiss Flat by default), and writes out_dir/mbeir.json,
out_dir/mbeir.md, out_dir/runs/<task>.<pool>.trec and out_dir/config.yaml. Rerunning the same
command reuses finished embeddings and indexes. Missing task files are skipped and reported.
Before embedding, every input file is validated (a file validate_data.py refuses is refused here
with the same FILE:LINE lines) and the index factory is checked against every pool's size.
With rerank=umarvel+ (U-MARVEL+: cos + w * P(Yes) of a trained re-ranker) or rerank=zeroshot
(MM-Embed: P(True) of the untrained base MLLM), each query's top-`rerank_top_k` is reordered by the
re-ranker on Ray Data actors; mbeir.md/json then hold the reranked numbers, retrieval.md/json the
first stage's, and out_dir/rerank/runs/ the reranked runs.
Exit codes: 0 done, 2 bad config, bad input files or nothing to evaluate, 1 any other failure.
"""

from __future__ import annotations

import sys
from typing import Any

from umarvel_ray.cli import run_job
from umarvel_ray.eval.evaluate import run_evaluation
from umarvel_ray.eval.plan import EvalConfig


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, print the table, what was skipped and the SUMMARY line."""
    report = run_evaluation(cfg)
    with open(report["paths"]["markdown"]) as f:
        print(f.read(), flush=True)
    for key, why in report["skipped"].items():
        print(f"SKIPPED {key}: {why}", flush=True)
    for row in report["rejected"]:
        print(f"REJECTED {row}", flush=True)
    print(report["summary"], flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_job(EvalConfig, _evaluate, argv, __doc__, "eval")


if __name__ == "__main__":
    sys.exit(main())
