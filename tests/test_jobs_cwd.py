"""Jobs take relative paths from wherever they are started (the README's way of running them).

A path in a config is made absolute once, against the directory the job was started from; the
Ray workers that train and embed run elsewhere and still read the same files. A stage whose
starting model is missing stops before any start-up, with a message that names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "jobs/configs/toy.yaml")


def _job(script: str, args: list[str], cwd: Path, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_stage_whose_predecessor_is_missing_stops_before_startup(tmp_path):
    done = _job("train.py", ["--config", TOY, "--stage", "stage3", "run_dir=fresh"], cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 2, log[-3000:]
    assert (
        f"stage3 starts from stage2's merged model {tmp_path}/fresh/stage2/model, which does not exist yet" in log
    )
    assert "jobs/train.py --stage stage2" in log and "stage3.model=" in log and "stages=[stage3,...]" in log
    assert "started local Ray" not in log and "deepspeed" not in log.lower()


@pytest.mark.ray
@pytest.mark.slow
def test_stage_and_evaluation_jobs_run_from_another_directory(tmp_path, ray_cluster, tiny_model_dir, toy_mbeir_dir):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "base").symlink_to(tiny_model_dir)
    (work / "data").symlink_to(toy_mbeir_dir)
    address = ray_cluster.get_runtime_context().gcs_address

    train = _job(
        "train.py",
        [
            "--config", TOY, "--stage", "stage3",
            "run_dir=runs/r", "data_root=data", "model=models/base", "stages=[stage3]",
            "common.workers=1", "common.cpus_per_worker=0.5", "common.save_every=2",
            "stage3.max_steps=2", "stage3.per_device_batch=4", "stage3.max_examples=16",
        ],
        cwd=work,
        ray_address=address,
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    model = work / "runs/r/stage3/model"
    assert (model / "config.json").is_file()
    saved = yaml.safe_load((work / "runs/r/stage3/config.yaml").read_text())
    assert saved["model"] == str(work / "models/base")
    assert saved["train_file"] == str(work / "data/query/train/mbeir_union_up_train.jsonl")

    evaluate = _job(
        "evaluate.py",
        [
            "--config", TOY, "model=runs/r/stage3/model", "out_dir=runs/r/eval", "data_root=data",
            "tasks=[mscoco_task0]", "pools=[local]", "embed.actor_num_cpus=0.5", "embed.decode_num_cpus=0.5",
        ],
        cwd=work,
        ray_address=address,
    )
    assert evaluate.returncode == 0, (evaluate.stdout + evaluate.stderr)[-4000:]
    assert "SUMMARY evaluate" in evaluate.stdout and "local_tasks=1" in evaluate.stdout
    assert "mscoco_task0" in json.loads((work / "runs/r/eval/mbeir.json").read_text())["tasks"]
    used = yaml.safe_load((work / "runs/r/eval/config.yaml").read_text())
    assert (used["model"], used["data_root"]) == (str(model), str(work / "data"))


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (
            "evaluate.py",
            ["model=runs/nope/model", "out_dir=ev"],
            "model: model directory {cwd}/runs/nope/model not found (no config.json there)",
        ),
        (
            "train_reranker.py",
            ["run_dir=rr", "model=Qwen/Qwen2-VL-2B-Instruct"],
            "mined negatives not found: {cwd}/rr/negatives/negatives.jsonl; run jobs/mine_negatives.py",
        ),
        (
            "mine_negatives.py",
            ["model=runs/nope/model", "output_dir=mn", "data_root={toy}"],
            "model directory not found: {cwd}/runs/nope/model",
        ),
    ],
    ids=["evaluate-missing-model", "reranker-missing-negatives", "mine-missing-model"],
)
def test_a_job_with_a_missing_input_says_which_before_startup(script, args, message, tmp_path, toy_mbeir_dir):
    args = [a.format(toy=toy_mbeir_dir) for a in args]
    done = _job(script, ["--config", TOY, *args], cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 2, log[-3000:]
    assert message.format(cwd=tmp_path) in log
    assert "started local Ray" not in log and "Traceback" not in log
