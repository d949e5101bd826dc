"""Report outputs: the 16-task table in RECIPE order with correct averages, JSON, TREC run files."""

from __future__ import annotations

import json

import pytest

from umarvel_ray.data.catalogue import MBEIR_TASKS
from umarvel_ray.eval.metrics import RetrievalMetrics
from umarvel_ray.eval.report import (
    markdown_table,
    read_trec_run,
    report_dict,
    results_from_report,
    run_path,
    trec_lines,
    write_report,
    write_trec_run,
)


def metrics(hit: float, k: int, n: int = 10) -> RetrievalMetrics:
    return RetrievalMetrics(k=k, hit=hit, recall=hit / 2, mrr_at_k=hit / 3, mrr=hit / 3, n_queries=n)


def full_results() -> dict[str, dict[str, RetrievalMetrics]]:
    # local 0.30, 0.32, ..., 0.60 -> mean 0.45; global 0.20, 0.21, ..., 0.35 -> mean 0.275
    return {
        t.name: {"local": metrics(0.30 + 0.02 * i, t.k), "global": metrics(0.20 + 0.01 * i, t.k)}
        for i, t in enumerate(MBEIR_TASKS)
    }


def table_rows(md: str, header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_markdown_16_rows_in_recipe_order_with_averages():
    md = markdown_table(full_results())
    rows = table_rows(md, "| Task |")
    assert len(rows) == 17
    assert [r[0] for r in rows[:16]] == [t.label for t in MBEIR_TASKS]
    assert rows[0][0] == "VisualNews t->i" and rows[15][0] == "InfoSeek (i,t)->(i,t)"
    assert [r[1] for r in rows[:16]] == [f"R@{t.k}" for t in MBEIR_TASKS]
    assert rows[2][1] == "R@10" and rows[12][1] == "R@10" and rows[1][1] == "R@5"
    assert rows[3][2:] == ["36.0", "23.0"]
    assert rows[16] == ["**Average (avg of 16)**", "", "45.0", "27.5"]
    wide = table_rows(md, "| Pool |")
    header = md.splitlines()[[i for i, x in enumerate(md.splitlines()) if x.startswith("| Pool |")][0]]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == 18 and cells[1:17] == [f"{t.label} R@{t.k}" for t in MBEIR_TASKS]
    assert wide[0][0] == "local" and wide[0][1] == "30.0" and wide[0][-1] == "45.0"
    assert wide[1][0] == "global" and wide[1][16] == "35.0" and wide[1][-1] == "27.5"
    assert "Partial run" not in md


def test_partial_results_average_present_tasks_and_say_so():
    t = MBEIR_TASKS
    results = {
        t[0].name: {"local": metrics(0.1, t[0].k), "global": metrics(0.4, t[0].k)},
        t[5].name: {"local": metrics(0.2, t[5].k)},
        t[12].name: {"local": metrics(0.6, t[12].k), "global": metrics(0.2, t[12].k)},
    }
    md = markdown_table(results)
    rows = table_rows(md, "| Task |")
    assert len(rows) == 17 and rows[1][2:] == ["-", "-"] and rows[5][2:] == ["20.0", "-"]
    assert rows[16] == [
        "**Average (local avg of 3/16 tasks present; global avg of 2/16 tasks present)**",
        "",
        "30.0",
        "30.0",
    ]
    assert "Partial run" in md and "mscoco_task0" in md
    data = report_dict(results)
    assert (
        data["averages"]["local"]["value"] == pytest.approx(0.3) and data["averages"]["local"]["n_tasks"] == 3
    )
    assert data["averages"]["global"]["n_tasks"] == 2 and len(data["averages"]["global"]["missing"]) == 14


def test_json_report_has_every_number(tmp_path):
    results = full_results()
    paths = write_report(
        tmp_path,
        results,
        settings={"model": "tiny", "instruction": "prompt_index=0"},
        task_settings={"cirr_task7": {"prompt_index": 0}},
    )
    data = json.loads(paths["json"].read_text())
    assert data["order"] == [t.name for t in MBEIR_TASKS]
    cirr = data["tasks"]["cirr_task7"]
    assert (
        cirr["label"] == "CIRR (i,t)->i"
        and cirr["metric"] == "R@5"
        and cirr["settings"] == {"prompt_index": 0}
    )
    assert cirr["local"]["hit"] == pytest.approx(0.30 + 0.02 * 13) and cirr["global"]["n_queries"] == 10
    assert {"recall", "mrr_at_k", "n_unreachable", "n_no_qrels"} <= set(cirr["local"])
    assert data["averages"]["local"]["label"] == "avg of 16" and data["settings"]["model"] == "tiny"
    assert results_from_report(data) == results
    assert paths["markdown"].read_text() == markdown_table(results)


def test_inconsistent_results_are_rejected():
    with pytest.raises(ValueError, match="unknown tasks"):
        report_dict({"mscoco_task5": {"local": metrics(0.5, 5)}})
    with pytest.raises(ValueError, match="R@10"):
        report_dict({"fashioniq_task7": {"local": metrics(0.5, 5)}})


def test_trec_lines_format_and_round_trip(tmp_path):
    run = {"9:1": [("9:10", 0.75), ("9:3", 0.5), ("", float("-inf"))], "9:2": [("9:3", 0.25)]}
    lines = list(trec_lines(run, "umarvel"))
    assert lines == [
        "9:1 Q0 9:10 1 0.750000 umarvel",
        "9:1 Q0 9:3 2 0.500000 umarvel",
        "9:2 Q0 9:3 1 0.250000 umarvel",
    ]
    path = run_path(tmp_path, "mscoco_task0", "global")
    assert path.name == "mscoco_task0.global.trec"
    assert write_trec_run(path, run, "umarvel") == 3
    assert read_trec_run(path) == {"9:1": [("9:10", 0.75), ("9:3", 0.5)], "9:2": [("9:3", 0.25)]}
    with pytest.raises(ValueError, match="run_id"):
        list(trec_lines(run, "two words"))
    with pytest.raises(ValueError, match="pool"):
        run_path(tmp_path, "mscoco_task0", "union")
