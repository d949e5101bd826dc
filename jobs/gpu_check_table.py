"""The summary table of jobs/gpu_check.sh: one row per check (name, figure, goal, result).

    python jobs/gpu_check_table.py --mode gpu OUT_DIR      # OUT_DIR: what gpu_check.sh wrote

Reads each piece's exit code (NAME.rc), JSON and pytest's junit XML from OUT_DIR, prints the table
as markdown (and writes OUT_DIR/summary.md). In `--mode smoke` (toy sizes on CPU) figures are shown
but not judged against the goals: the result is `ran` or `FAILED`. Exit 0 when every row passed
(smoke: ran), 1 otherwise. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

GOALS = {"forward": 0.40, "train": 0.35, "embed": 0.90, "search": 0.99}


def _failed(out: Path, name: str) -> str | None:
    """Why a piece produced nothing to read (None when it ran)."""
    rc_file = out / f"{name}.rc"
    rc = rc_file.read_text().strip() if rc_file.is_file() else "missing"
    if rc == "0":
        return None
    log = out / f"{name}.log"
    last = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] if log.is_file() else []
    why = "timed out" if rc in ("124", "137") else f"exit {rc}"
    return f"{why}: {last[0][:120] if last else 'no log'}"


def _json(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def pytest_row(out: Path) -> tuple[str, bool]:
    suite = ET.parse(out / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    figure = f"{passed} passed, {counts['skipped']} skipped, {counts['failures'] + counts['errors']} failed"
    if reasons:
        figure += " (skipped: " + "; ".join(r[:80] for r in reasons) + ")"
    return figure, passed >= 1 and counts["failures"] + counts["errors"] == 0


def rows(out: Path) -> list[tuple[str, str, str, str, bool]]:
    """(check, figure, goal, piece name, goal met) per check; figure says why when a piece failed."""
    table = []
    specs = [
        ("pytest", 'pytest -m "gpu and not ray"', "all pass"),
        ("forward", "forward MFU (bench_model, 2B bf16)", f">= {GOALS['forward']:.0%}"),
        ("train", "LoRA step MFU (bench_train, 2B bf16, TorchEngine)", f">= {GOALS['train']:.0%}"),
        ("embed", "embedding loop / model-only (bench_embed --no-ray)", f">= {GOALS['embed']:.2f}"),
        ("search", "exact search GPU vs CPU (bench_search)", f"top-k ids equal >= {GOALS['search']:.0%}"),
    ]
    for name, check, goal in specs:
        why = _failed(out, name)
        if why is not None:
            table.append((check, why, goal, name, False))
            continue
        if name == "pytest":
            figure, ok = pytest_row(out)
        elif name == "forward":
            r = _json(out, name)
            b = r["best"]
            figure = f"{b['mfu']:.1%} ({b['modality']}, batch {b['batch']}; {r['model']}, {r['device']})"
            ok = b["mfu"] >= GOALS[name]
        elif name == "train":
            r = _json(out, name)
            figure = f"{r['mfu']:.1%} ({r['samples_per_s']:.1f} samples/s, batch {r['batch']}; {r['model']}, {r['device']})"
            ok = r["mfu"] >= GOALS[name]
        elif name == "embed":
            r = _json(out, name)
            figure = (
                f"{r['ratio_loop_model_only']:.2f} ({r['loop_items_per_s']:.0f} vs "
                f"{r['model_only_items_per_s']:.0f} items/s; {r['model']}, {r['device']})"
            )
            ok = r["ratio_loop_model_only"] >= GOALS[name]
        else:
            r = _json(out, name)
            acc, cpu = r["accelerated"], r["cpu"]
            figure = (
                f"{r['speedup']:.1f}x: {acc['queries_per_s']:.0f} vs {cpu['queries_per_s']:.0f} queries/s "
                f"(torch on {acc['device']} vs {cpu['backend']} on cpu, {r['vectors']} x {r['dim']}); "
                f"ids equal {r['agreement']:.1%}"
            )
            ok = r["agreement"] >= GOALS[name]
        table.append((check, figure, goal, name, ok))
    return table


def render(table: list[tuple[str, str, str, str, bool]], mode: str) -> tuple[str, bool]:
    lines = [
        f"GPU check ({'SMOKE: toy sizes on CPU, figures not judged' if mode == 'smoke' else 'GPU'}) "
        f"on {platform.node()}",
        "",
        "| check | figure | goal | result |",
        "|---|---|---|---|",
    ]
    all_ok = True
    for check, figure, goal, _, ok in table:
        ran = not figure.startswith(("exit ", "timed out"))
        result = ("ran" if ran else "FAILED") if mode == "smoke" else ("PASS" if ok else "FAIL")
        all_ok &= ran if mode == "smoke" else ok
        lines.append(f"| {check} | {figure} | {goal} | {result} |")
    return "\n".join(lines) + "\n", all_ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["gpu", "smoke"], default="gpu")
    p.add_argument("out", help="the directory gpu_check.sh wrote")
    args = p.parse_args(argv)
    out = Path(args.out)
    text, ok = render(rows(out), args.mode)
    (out / "summary.md").write_text(text)
    print(text, end="")
    print(f"summary: {out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
