"""Two-node Ray scenarios on one machine (`ray.cluster_utils.Cluster`, loopback), one per process.

    python tests/multinode_scenarios.py SCENARIO --model DIR --data DIR --work DIR

A driver connects to one Ray cluster only, and the test session already holds its own local Ray,
so `tests/test_multinode.py` runs each scenario here in a subprocess with a hard timeout. Each
scenario builds a head and one worker node, runs, checks, and always shuts the cluster down.
Scenarios:

- `train`: a 2-worker Ray Train + DeepSpeed (gloo, CPU) stage-3 run on the tiny model; every node
  has 1 CPU and every worker asks for 1, so rank 0 and rank 1 must sit on different nodes.
- `train_node_loss`: the same, with the worker node removed while its rank is held after step 3
  and a new node added: Ray Train (max_failures=1) restarts both ranks from step 2's checkpoint.
- `embed_node_loss`: `run_embedding` over both nodes (one embedder actor per node: Ray Data spreads
  its 2 actors of 1 CPU over the head's 3 CPUs and the worker's 2); after 2 committed shards the worker node
  is removed with everything on it. The job must finish, or a resubmission on the surviving head
  must, with every id exactly once and rows in = out + rejected.
- `embed_actor_kill`: the same with the worker node's embedder actor SIGKILLed instead.
- `embed_driver_kill`: the job runs in a second driver process (`embed_driver`, joined through
  RAY_ADDRESS), SIGKILLed after 2 committed shards; Ray must end its actors, and the same job
  resubmitted from this process resumes and completes.

The last stdout line is `RESULT <json>` (what the test re-checks); any failed check exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import umarvel_ray  # noqa: F401  (before ray: keeps a local Ray on loopback, see runtime.py)

LOOPBACK = "127.0.0.1"
OBJECT_STORE = 150 * 1024 * 1024
N_ROWS = 360  # toy pool rows embedded; with 3 planted bad rows 363 lines, 19 shards of 20
SHARD_ROWS = 20
FIRE_AFTER_SHARDS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_nodes(head_cpus: int, worker_cpus: int) -> Iterator[tuple[Any, Any]]:
    """A head (this driver's node) and one worker node on 127.0.0.1; torn down whatever happens.

    RAY_ADDRESS names the head's GCS before any process starts, so every raylet and worker
    inherits it and code that looks the cluster up without an address (Ray Train's placement
    group cleaner) finds this one even when other Ray instances run on the machine.
    """
    import ray
    from ray.cluster_utils import Cluster

    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{gcs_port}"
    common = dict(node_ip_address=LOOPBACK, object_store_memory=OBJECT_STORE, include_dashboard=False)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args=dict(
                common,
                num_cpus=head_cpus,
                gcs_server_port=gcs_port,
                dashboard_agent_listen_port=free_port(),
                resources={"head_node": 1},
            ),
        )
        worker = cluster.add_node(**common, num_cpus=worker_cpus, resources={"worker_node": 1})
        cluster.wait_for_nodes()
        cluster.connect()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        check(len(nodes) == 2, f"expected 2 live nodes, got {len(nodes)}")
        yield cluster, worker
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


# ---------------------------------------------------------------------------------------------
# a. training, one worker per node
# ---------------------------------------------------------------------------------------------


PAUSED = "paused"  # written by the rank that stops after PAUSE_AT_STEP on the node to be removed
PAUSE_AT_STEP = 3


def recording_loop(log_dir: str, pause_on_node: str | None) -> Callable[[dict[str, Any]], None]:
    """The library's training loop, after recording where this rank runs (`rank<N>-<pid>.json`).

    With `pause_on_node`, the rank on that node stops after step PAUSE_AT_STEP (step 2's
    checkpoint is reported by then) and writes PAUSED, so the node is removed mid-run at a known
    step whatever the machine's speed."""

    def loop(config: dict[str, Any]) -> None:
        import ray
        import ray.train

        from umarvel_ray.train import embedder, worker

        rank = ray.train.get_context().get_world_rank()
        node = ray.get_runtime_context().get_node_id()
        where = {"rank": rank, "node_id": node, "pid": os.getpid()}
        (Path(log_dir) / f"rank{rank}-{os.getpid()}.json").write_text(json.dumps(where))
        if node == pause_on_node:
            report = worker.checkpoint_or_report

            def report_then_pause(engine: Any, cfg: Any, step: int, *args: Any) -> None:
                report(engine, cfg, step, *args)
                if step == PAUSE_AT_STEP:
                    (Path(log_dir) / PAUSED).write_text(str(os.getpid()))
                    time.sleep(600)  # until the node goes

            worker.checkpoint_or_report = report_then_pause
        embedder.train_loop_per_worker(config)

    return loop


def scenario_train(model: Path, data: Path, work: Path, node_loss: bool) -> dict[str, Any]:
    """Two ranks, one per node. With `node_loss`, the worker node is removed while its rank is
    paused after step 3 and a new node joins (as an autoscaler would replace it): Ray Train
    restarts the group (max_failures=1) from the step-2 checkpoint and the run finishes."""
    from umarvel_ray.layout import STEPS_FILE
    from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
    from umarvel_ray.train.config import TrainConfig
    from umarvel_ray.train.launch import stage_done, torch_trainer

    total = 4 if node_loss else 3
    cfg = TrainConfig(
        stage="stage3",
        run_dir=str(work / "run"),
        model=str(model),
        data_kind="mbeir",
        data_root=str(data),
        objective="infonce",
        zero_stage=2,
        lora_r=4,
        lora_alpha=8,
        lr=1e-3,
        per_device_batch=4,
        max_examples=64,
        max_steps=total,
        save_every=2,
        log_every=1,
        workers=2,
        cpus_per_worker=1,
        max_failures=1 if node_loss else 0,
    )
    ranks_dir = work / "ranks"
    ranks_dir.mkdir(parents=True)
    info: dict[str, Any] = {}
    with two_nodes(head_cpus=1, worker_cpus=1) as (cluster, worker):
        head_id, worker_id = cluster.head_node.node_id, worker.node_id

        def replace_worker_node() -> dict[str, Any]:
            cluster.remove_node(worker)
            # A node registers exit hooks with signal.signal, which only the main thread may call
            # (it runs fit()); this one goes without them: two_nodes' shutdown() still removes it.
            cluster._shutdown_at_exit = False
            new = cluster.add_node(
                node_ip_address=LOOPBACK,
                object_store_memory=OBJECT_STORE,
                include_dashboard=False,
                num_cpus=1,
                resources={"worker_node": 1},
            )
            return {"new_node_id": new.node_id}

        trigger = Trigger(ranks_dir / PAUSED, replace_worker_node, ready=lambda p: p.is_file())
        if node_loss:
            trigger.start()
        loop = recording_loop(str(ranks_dir), worker_id if node_loss else None)
        result = torch_trainer(loop, cfg, name=cfg.stage).fit()
        trigger.stop.set()
        check(getattr(result, "error", None) is None, f"training failed: {getattr(result, 'error', None)}")
        if node_loss:
            trigger.join(timeout=30)
            if trigger.error is not None:
                raise trigger.error
            check(trigger.info is not None, "the worker node was never removed")
            info = trigger.info
    names = {head_id: "head", worker_id: "worker", info.get("new_node_id"): "new"}
    runs = sorted((json.loads(p.read_text()) for p in ranks_dir.glob("rank*.json")), key=lambda r: r["pid"])
    placed = sorted(names.get(r["node_id"], "?") for r in runs)
    want = sorted(["head", "worker"] + (["head", "new"] if node_loss else []))
    check(placed == want, f"ranks ran on {placed}, want {want}")
    ranks = sorted(r["rank"] for r in runs)
    check(ranks == sorted([0, 1] * (2 if node_loss else 1)), f"ranks started: {ranks}")
    check(stage_done(cfg), f"no merged model at {cfg.model_dir}")
    steps = [json.loads(line)["step"] for line in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    check(steps == ([1, 2, 3, 3, 4] if node_loss else [1, 2, 3]), f"steps logged: {steps}")
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    check(summary["total_steps"] == total, f"summary: {summary}")
    check(summary["resumed_at"] == (2 if node_loss else 0), f"summary: {summary}")
    ckpt = sorted((Path(cfg.run_dir) / "ray" / cfg.stage).glob("step_*"))[-1]
    state = json.loads((ckpt / f"global_step{total}" / "train_state.json").read_text())
    check(state["world_size"] == 2 and state["global_step"] == total, f"checkpoint state: {state}")
    return {
        "rank_nodes": {str(r["rank"]) + "@" + str(r["pid"]): names.get(r["node_id"], "?") for r in runs},
        "steps": steps,
        "resumed_at": summary["resumed_at"],
        "model_dir": str(cfg.model_dir),
        "checkpoint": ckpt.name,
    }


# ---------------------------------------------------------------------------------------------
# b, c. embedding with a node removed / an actor killed part-way
# ---------------------------------------------------------------------------------------------


def write_input(data: Path, path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """The first N_ROWS rows of the toy test pool plus 3 bad rows (a malformed line, a missing
    image, a repeated id) spread over early and late shards. Returns the valid ids in order and
    (1-based line, reject field) of the bad rows."""
    pool = data / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    rows = [json.loads(line) for line in pool.read_text().splitlines()[:N_ROWS]]
    lines = [json.dumps(r) for r in rows]
    missing = dict(rows[0], did="999:1", img_path="mbeir_images/none/missing.png", modality="image")
    bad = {
        7: ('{"did": "999:2", "txt": "cut', "<json>"),
        180: (json.dumps(missing), "img_path"),
        340: (json.dumps(rows[3]), "did"),
    }
    for at in sorted(bad):
        lines.insert(at, bad[at][0])
    path.write_text("\n".join(lines) + "\n")
    return [r["did"] for r in rows], [(at + 1, bad[at][1]) for at in sorted(bad)]


ACTOR_CPUS = 2  # per embedder actor in the embed scenarios


class Reserve:
    """Holds CPUs on the head until the fault (see `scenario_embed`)."""

    def ready(self) -> bool:
        return True


def embed_actors(node_id: str | None = None) -> list[dict[str, Any]]:
    """Alive Ray Data map workers (the embedder actor pool), from the GCS actor table."""
    import ray._private.state as state

    actors = state.actors().values()
    return [
        a
        for a in actors
        if "MapWorker" in a["ActorClassName"]
        and a["State"] == "ALIVE"
        and (node_id is None or a["Address"]["NodeID"] == node_id)
    ]


class Trigger(threading.Thread):
    """Runs `action` once, as soon as `ready(path)`; by default when the embedding job's progress
    file lists FIRE_AFTER_SHARDS committed shards (the driver commits a shard the moment its last
    row arrives, so the rest is in flight)."""

    def __init__(
        self,
        progress: Path,
        action: Callable[[], dict[str, Any]],
        ready: Callable[[Path], bool] | None = None,
    ):
        super().__init__(daemon=True)
        self.progress, self.action = progress, action
        self.ready = ready or (lambda p: self.committed() >= FIRE_AFTER_SHARDS)
        self.stop = threading.Event()
        self.info: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def committed(self) -> int:
        try:
            return len(json.loads(self.progress.read_text())["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def run(self) -> None:
        while not self.stop.is_set():
            if self.ready(self.progress):
                try:
                    self.info = {"committed_before": self.committed(), **self.action()}
                except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
                    self.error = exc
                return
            time.sleep(0.02)


def embed_config(model: Path, data: Path, work: Path) -> Any:
    """The embedding job of every embed scenario (the killed driver's and its resubmission's)."""
    from umarvel_ray.embed.config import EmbedConfig

    return EmbedConfig(
        input=str(work / "pool.jsonl"),
        data_root=str(data),
        model=str(model),
        output_dir=str(work / "emb"),
        shard_rows=SHARD_ROWS,
        chunk_rows=5,
        batch_size=4,
        num_actors=2,
        actor_num_cpus=float(ACTOR_CPUS),
        decode_num_cpus=0.5,
        decode_memory_mb=256,
        max_decode_tasks=2,
        torch_threads=1,
        collate_in="actor",
        progress_every_s=2.0,
    )


def attempt_runs(cfg: Any, attempts: list[str], tries: int) -> Any:
    """`run_embedding`, resubmitted on failure up to `tries` runs in all; None if none completed."""
    from umarvel_ray.embed.run import run_embedding

    for attempt in range(tries):
        try:
            result = run_embedding(cfg)
            attempts.append("completed")
            return result
        except Exception as exc:  # noqa: BLE001 - a failed run is resubmitted
            logging.exception("embedding attempt %d failed", attempt + 1)
            attempts.append(f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    return None


def scenario_embed(model: Path, data: Path, work: Path, fault: str) -> dict[str, Any]:
    """`fault`: node (remove the worker node), actor (SIGKILL the worker node's embedder actor) or
    driver (SIGKILL a separate driver process running the job, then resubmit from this one)."""
    import ray
    import ray._private.state as state

    from umarvel_ray.embed.commit import PROGRESS_NAME

    valid_ids, bad = write_input(data, work / "pool.jsonl")
    cfg = embed_config(model, data, work)
    n_shards = -(-(len(valid_ids) + len(bad)) // SHARD_ROWS)
    attempts: list[str] = []
    # One embedder actor per node, by resources rather than by Ray Data's best-effort spreading
    # (which once put both on the head): each node has room for one actor (2 CPUs) and the decode
    # tasks, not for two, because a reserve actor holds half the head. The fault first frees the
    # reserve, as a cluster with spare capacity would have it: after the worker node is gone the
    # head must hold both actors plus a decode task (with no room, the restarted actor took the
    # last CPUs, the decode tasks that rebuild the lost blocks never ran, and the job waited forever).
    with two_nodes(head_cpus=2 * ACTOR_CPUS + 2, worker_cpus=ACTOR_CPUS + 1) as (cluster, worker):
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        child = None
        reserve = (
            ray.remote(num_cpus=ACTOR_CPUS + 1, resources={"head_node": 0.01})(Reserve).remote()
        )
        ray.get(reserve.ready.remote(), timeout=60)

        def inject() -> dict[str, Any]:
            ray.kill(reserve)
            on_worker = embed_actors(worker_id)
            check(len(on_worker) == 1, f"want 1 embedder actor on the worker node, got {len(on_worker)}")
            if fault == "node":
                cluster.remove_node(worker)
                return {"actors_on_removed_node": len(on_worker)}
            if fault == "actor":
                os.kill(on_worker[0]["Pid"], signal.SIGKILL)
                return {"killed_actor": on_worker[0]["ActorID"], "killed_pid": on_worker[0]["Pid"]}
            os.kill(child.pid, signal.SIGKILL)
            return {"killed_driver_pid": child.pid}

        trigger = Trigger(Path(cfg.output_dir) / PROGRESS_NAME, inject)
        if fault == "driver":  # the job's driver is another process, joined through RAY_ADDRESS
            child = subprocess.Popen([sys.executable, __file__, "embed_driver", *sys.argv[2:]])
        trigger.start()
        if child is not None:
            rc = child.wait(timeout=240)
            attempts.append(f"driver exited {rc}")
            check(rc == -signal.SIGKILL, f"the first driver was not killed (exit {rc})")
            # Ray ends a dead driver's (non-detached) actors: none of its embedders may remain.
            deadline = time.time() + 60
            while embed_actors() and time.time() < deadline:
                time.sleep(0.5)
            check(not embed_actors(), f"the dead driver's actors are still alive: {embed_actors()}")
        result = attempt_runs(cfg, attempts, tries=1 if child is not None else 2)
        trigger.stop.set()
        trigger.join(timeout=30)
        if trigger.error is not None:
            raise trigger.error
        check(trigger.info is not None, "the fault was never injected (the job never committed 2 shards)")
        check(result is not None, f"no attempt completed: {attempts}")
        restarts = None
        if fault == "actor":
            restarts = state.actors(trigger.info["killed_actor"])["NumRestarts"]
            check(restarts >= 1, f"the killed actor was not restarted (NumRestarts={restarts})")
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        check(
            alive == sorted([head_id] if fault == "node" else [head_id, worker_id]), f"alive nodes: {alive}"
        )
    info = trigger.info
    check(
        info["committed_before"] <= n_shards - 5,
        f"fault injected after {info['committed_before']} of {n_shards} shards: too late to test anything",
    )
    return check_embedding(Path(cfg.output_dir), result, valid_ids, bad, model, data) | {
        "attempts": attempts,
        "fault": info,
        "killed_actor_restarts": restarts,
        "shards": n_shards,
        "shards_skipped": result.shards_skipped,
        "shards_written": result.shards_written,
    }


def check_embedding(
    out: Path, result: Any, valid_ids: list[str], bad: list[tuple[int, str]], model: Path, data: Path
) -> dict[str, Any]:
    """Every valid id exactly once, the bad rows rejected by line and field, counts that add up,
    and vectors of the last two shards (embedded after the fault) equal to a direct encoding."""
    import numpy as np

    from umarvel_ray.data import model_items
    from umarvel_ray.data.images import load_image
    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.store import read_embeddings

    emb = read_embeddings(out)
    ids = [str(i) for i in emb.ids]
    check(len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} ids stored more than once")
    check(sorted(ids) == sorted(valid_ids), f"ids differ: {len(set(valid_ids) - set(ids))} missing")
    man = json.loads((out / "manifest.json").read_text())
    n_in = len(valid_ids) + len(bad)
    check(man["complete"] is True, "manifest not complete")
    got = (man["rows_in"], man["rows_out"], man["rows_rejected"])
    check(got == (n_in, len(valid_ids), len(bad)), f"manifest rows in/out/rejected {got}")
    check(all(s["rows_in"] == s["rows_out"] + s["rows_rejected"] for s in man["shards"]), "a shard's rows")
    check((result.rows_in, result.rows_out, result.rows_rejected) == got, f"result {result}")
    check(f"rows_in={n_in}, rows_out={len(valid_ids)}, rows_rejected={len(bad)}" in result.summary, "summary")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    check([(r["line"], r["field"]) for r in rejects] == bad, f"rejects: {rejects}")
    check(bool(np.isfinite(emb.vectors).all()), "non-finite vectors")
    # The last two shards were embedded after the fault (by the surviving or restarted actor).
    first, last = man["shards"][-2]["first_line"], man["shards"][-1]["last_line"]
    bad_lines = {line for line, _ in bad}
    text = Path(man["input"]).read_text().splitlines()
    rows = [json.loads(text[n - 1]) for n in range(first, last + 1) if n not in bad_lines]
    items = []
    for r in rows:
        item = model_items.candidate_item(r)
        if item["image"]:
            item["image"] = load_image(data, item["image"])
        items.append(item)
    direct = Embedder.load(model).encode_candidates(items, batch_size=4)
    order = {rid: i for i, rid in enumerate(ids)}
    stored = emb.vectors[[order[r["did"]] for r in rows]]
    diff = float(np.abs(stored - direct).max())
    check(diff < 1e-4, f"the last shards' vectors differ from the direct encoding by {diff}")
    return {"rows": got, "ids": len(ids), "rejects": len(rejects), "rows_checked_against_direct": len(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "scenario",
        choices=[
            "train",
            "train_node_loss",
            "embed_node_loss",
            "embed_actor_kill",
            "embed_driver_kill",
            "embed_driver",
        ],
    )
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.scenario == "embed_driver":  # the driver `embed_driver_kill` kills: joins RAY_ADDRESS
        from umarvel_ray.embed.run import run_embedding

        run_embedding(embed_config(a.model, a.data, a.work))
        return 0
    if a.scenario in ("train", "train_node_loss"):
        res = scenario_train(a.model, a.data, a.work, node_loss=a.scenario == "train_node_loss")
    else:
        fault = {"embed_node_loss": "node", "embed_actor_kill": "actor", "embed_driver_kill": "driver"}
        res = scenario_embed(a.model, a.data, a.work, fault[a.scenario])
    res["seconds"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
