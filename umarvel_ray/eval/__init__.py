"""M-BEIR evaluation: metrics on runs, and the run files / JSON / markdown tables they feed."""

from umarvel_ray.eval.metrics import (
    QueryScores,
    RetrievalMetrics,
    Run,
    evaluate_run,
    hit_rate_at_k,
    macro_average,
    mrr_at_k,
    per_query,
    recall_at_k,
    run_from_search,
)
from umarvel_ray.eval.report import (
    POOLS,
    markdown_table,
    read_trec_run,
    report_dict,
    results_from_report,
    run_path,
    trec_lines,
    write_report,
    write_trec_run,
)

__all__ = [
    "POOLS",
    "QueryScores",
    "RetrievalMetrics",
    "Run",
    "evaluate_run",
    "hit_rate_at_k",
    "macro_average",
    "markdown_table",
    "mrr_at_k",
    "per_query",
    "read_trec_run",
    "recall_at_k",
    "report_dict",
    "results_from_report",
    "run_from_search",
    "run_path",
    "trec_lines",
    "write_report",
    "write_trec_run",
]
