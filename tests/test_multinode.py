"""Two Ray nodes on one machine (`tests/multinode_scenarios.py`): training with one worker per
node, with and without losing a node; embedding through a node loss, a killed actor and a killed
driver (resubmitted).

Each scenario runs in its own Python process (a driver joins one Ray cluster only, and the test
session holds its own), under a hard timeout, and prints `RESULT <json>` last. Every process the
scenario starts (its driver, both nodes' raylets and GCS, every worker) carries a unique marker in
its environment; after the scenario no process with that marker may remain. Any that does is
killed by its pid and fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "multinode_scenarios.py"
TIMEOUT_S = 420
MARKER = "UMARVEL_MULTINODE_SCENARIO"


def _marked(tag: str) -> list[int]:
    """Pids of live processes whose environment holds MARKER=tag (this scenario's processes)."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def _ps(pids: list[int]) -> str:
    if not pids:
        return ""
    return subprocess.run(
        ["ps", "-o", "pid,etime,rss,cmd", "-p", ",".join(map(str, pids))], capture_output=True, text=True
    ).stdout


def run_scenario(name: str, model: Path, data: Path, work: Path) -> dict:
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: tag})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(SCRIPT), name, "--model", str(model), "--data", str(data), "--work", str(work)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        rc = None
    # Nothing the scenario started may outlive it (removed nodes' processes exit within seconds).
    deadline = time.time() + 20
    while (left := _marked(tag)) and time.time() < deadline:
        time.sleep(0.5)
    listing = _ps(left)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    tail = out[-12000:]
    assert rc is not None, f"scenario {name} ran past {TIMEOUT_S}s; output:\n{tail}"
    assert rc == 0, f"scenario {name} exited {rc}; output:\n{tail}"
    assert not left, f"scenario {name} left processes running:\n{listing}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"scenario {name} printed no RESULT line; output:\n{tail}"
    res = json.loads(lines[-1][len("RESULT ") :])
    print(f"{name}: {res}")
    return res


def test_training_one_worker_per_node(tiny_model_dir, toy_mbeir_dir, tmp_path):
    res = run_scenario("train", tiny_model_dir, toy_mbeir_dir, tmp_path)
    assert sorted(res["rank_nodes"].values()) == ["head", "worker"]
    assert res["steps"] == [1, 2, 3] and res["resumed_at"] == 0
    assert (Path(res["model_dir"]) / "config.json").is_file()


def test_training_resumes_on_a_replacement_node(tiny_model_dir, toy_mbeir_dir, tmp_path):
    res = run_scenario("train_node_loss", tiny_model_dir, toy_mbeir_dir, tmp_path)
    # First group on head + worker; after the worker node went, the restarted group on head + new.
    assert sorted(res["rank_nodes"].values()) == ["head", "head", "new", "worker"]
    # Step 3 ran before the loss and again after the restart from step 2's checkpoint.
    assert res["steps"] == [1, 2, 3, 3, 4] and res["resumed_at"] == 2
    assert res["checkpoint"] == "step_00000004"
    assert (Path(res["model_dir"]) / "config.json").is_file()


def _check_embedding(res: dict, work: Path) -> None:
    assert res["rows"] == [363, 360, 3] and res["ids"] == 360 and res["rejects"] == 3
    assert res["rows_checked_against_direct"] >= 20
    assert res["fault"]["committed_before"] <= res["shards"] - 5
    ids = [json.loads(line)["id"] for line in (work / "emb" / "rejects.jsonl").read_text().splitlines()]
    repeated = json.loads((work / "pool.jsonl").read_text().splitlines()[340])["did"]
    assert ids == [None, "999:1", repeated]


def test_embedding_survives_node_removal(tiny_model_dir, toy_mbeir_dir, tmp_path):
    res = run_scenario("embed_node_loss", tiny_model_dir, toy_mbeir_dir, tmp_path)
    assert res["fault"]["actors_on_removed_node"] == 1
    assert res["attempts"][-1] == "completed" and len(res["attempts"]) <= 2
    _check_embedding(res, tmp_path)


def test_embedding_survives_killed_actor(tiny_model_dir, toy_mbeir_dir, tmp_path):
    res = run_scenario("embed_actor_kill", tiny_model_dir, toy_mbeir_dir, tmp_path)
    assert res["killed_actor_restarts"] >= 1
    assert res["attempts"] == ["completed"]
    _check_embedding(res, tmp_path)


def test_embedding_resubmitted_after_driver_death(tiny_model_dir, toy_mbeir_dir, tmp_path):
    res = run_scenario("embed_driver_kill", tiny_model_dir, toy_mbeir_dir, tmp_path)
    assert res["attempts"] == [f"driver exited {-signal.SIGKILL}", "completed"]
    # The resubmission kept the dead driver's committed shards and embedded only the rest.
    assert res["shards_skipped"] >= res["fault"]["committed_before"] >= 2
    assert res["shards_skipped"] + res["shards_written"] == res["shards"]
    _check_embedding(res, tmp_path)
