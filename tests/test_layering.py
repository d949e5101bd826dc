"""The package's floors: every import points down, step packages never import each other, and no
module or function grows past what one reader holds in mind.

Read from the source with `ast` (every import, including the lazy ones inside functions), so a
new arrow back up fails here before anyone has to untangle it. The floors, top to bottom:

    5  recipe, cli, ablation           the chain of steps; the jobs' entry helper; multi-step ablations
    4  eval, mine, teacher, serve      the steps (siblings: never import each other)
    3  embed, train                    the Ray Data embedding job; the training loop
    2  model, index, layout            the embedder/reranker; vector search; run-directory paths
    1  runtime, store, data            Ray start-up; the embedding store; M-BEIR IO and artefact formats
    0  config, io, progress, procmem   utilities every floor may use

A module may import its own unit and any unit on a lower floor; floor 0 units may also import
each other (they are leaves: none imports anything else of the package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "umarvel_ray"

FLOORS: dict[str, int] = {
    "config": 0, "io": 0, "progress": 0, "procmem": 0,
    "runtime": 1, "store": 1, "data": 1,
    "model": 2, "index": 2, "layout": 2,
    "embed": 3, "train": 3, "rerank": 3,
    "eval": 4, "mine": 4, "teacher": 4, "serve": 4,
    "recipe": 5, "cli": 5, "ablation": 5,
}  # fmt: skip

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
FUNCTION_LIMIT_EXEMPT = ("data/toy/",)  # the toy benchmark generator: long tables of fixture data


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def unit_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
        return None  # the package root re-exports nothing from the floors
    return rel.parts[0].removesuffix(".py")


def imported_units(path: Path) -> list[tuple[int, str]]:
    """(line, unit) for every `umarvel_ray.<unit>` the module imports, at any depth of the code."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; spell umarvel_ray.<unit>")
            names = [node.module] if node.module != "umarvel_ray" else [f"umarvel_ray.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "umarvel_ray" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def test_every_unit_has_a_floor() -> None:
    units = {unit_of(p) for p in modules()} - {None}
    assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"


def test_imports_point_down_and_steps_do_not_import_siblings() -> None:
    bad = []
    for path in modules():
        unit = unit_of(path)
        if unit is None:
            continue
        for line, target in imported_units(path):
            if target == unit:
                continue
            here, there = FLOORS[unit], FLOORS.get(target)
            if there is None:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports umarvel_ray.{target}, which does not exist")
            elif there > here or (there == here and here != 0):
                kind = "up" if there > here else "sideways"
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {kind}: {unit} (floor {here}) -> {target} (floor {there})")
    assert not bad, "\n".join(bad)


def test_no_module_over_the_line_limit() -> None:
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_function_over_the_line_limit() -> None:
    long = []
    for p in modules():
        rel = str(p.relative_to(PACKAGE))
        if rel.startswith(FUNCTION_LIMIT_EXEMPT):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize(
    "source, message",
    [
        ("from umarvel_ray.eval import metrics\n", "imports up: index (floor 2) -> eval (floor 4)"),
        ("import umarvel_ray.model.embedder\n", "imports sideways: index (floor 2) -> model (floor 2)"),
    ],
)
def test_the_rule_catches_a_bad_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str) -> None:
    """The check itself must fail on an arrow back up and on a sibling import."""
    fake = tmp_path / "umarvel_ray"
    (fake / "index").mkdir(parents=True)
    (fake / "index" / "bad.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        test_imports_point_down_and_steps_do_not_import_siblings()
