"""Checks that a cluster manifest agrees with the code (used by tests/test_cluster_manifests.py).

Each `check_*` raises AssertionError naming the manifest part that disagrees, so the tests can run
them on the committed files and on mutated copies (which must fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.compile(r"\d+\.\d+\.\d+")


def pyproject_pins() -> dict[str, str]:
    """Normalised requirement name -> specifier of pyproject's dependencies (e.g. ray -> ==2.60.0)."""
    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ImportError:  # Python 3.10: the quoted strings of the dependencies list
        block = text.split("dependencies = [", 1)[1].split("]\n", 1)[0]
        deps = [ln.split('"')[1] for ln in block.splitlines() if ln.strip().startswith('"')]
    return {_norm(Requirement(d).name): str(Requirement(d).specifier) for d in deps}


def ray_pin() -> str:
    spec = pyproject_pins()["ray"]
    assert spec.startswith("==") and VERSION.fullmatch(spec[2:]), f"pyproject pins ray as {spec!r}, not ==X.Y.Z"
    return spec[2:]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _walk(node: Any, where: str = ""):
    """(key path, key, value) of every mapping entry in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{where}.{k}", k, v
            yield from _walk(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{where}[{i}]")


# ------------------------------------------------------------------------------------ versions


def check_image(image: str, pin: str, where: str) -> None:
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    found = VERSION.findall(tag)
    assert found == [pin], f"{where}: image {image!r} is not tagged with Ray {pin}"


def check_versions(doc: Any, pin: str, where: str) -> None:
    """Every image tag and rayVersion in a manifest names the pinned Ray version."""
    seen = 0
    for path, key, value in _walk(doc):
        if key == "image":
            check_image(str(value), pin, f"{where}{path}")
            seen += 1
        elif key == "rayVersion":
            assert str(value) == pin, f"{where}{path}: rayVersion {value!r} != pyproject's ray=={pin}"
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind in ("RayCluster", "RayJob", "RayService"):
        assert seen >= 2, f"{where}: a {kind} without head and worker images"


def check_requirements(texts: list[str], where: str) -> None:
    """Quoted pip requirements in `texts` that pyproject also names carry pyproject's specifier."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet

    pins = pyproject_pins()
    for text in texts:
        for raw in re.findall(r"\"([A-Za-z0-9_.\-\[\],]+[=<>!~][^\"]*)\"", text):
            try:
                req = Requirement(raw)
            except InvalidRequirement:
                continue
            name = _norm(req.name)
            if name not in pins or not pins[name]:
                continue
            exact = [s.version for s in req.specifier if s.operator == "=="]
            ok = (
                SpecifierSet(pins[name]).contains(exact[0], prereleases=True)
                if len(exact) == 1 and not pins[name].startswith("==")
                else str(req.specifier) == pins[name]
            )
            assert ok, f"{where}: {raw!r} but pyproject has {name}{pins[name]}"


# ------------------------------------------------------------------------------------ jobs


class _Parsed(Exception):
    def __init__(self, cls: type, cfg: Any = None, error: Exception | None = None):
        super().__init__(cls.__name__)
        self.cls, self.cfg, self.error = cls, cfg, error


def parse_job(script: Path, args: list[str]) -> Any:
    """The config `script`'s own main() builds from `args`, stopped before anything runs.

    The job's `run_job` / `parse_job_args` (whichever it calls) is swapped for one that parses with
    the real `parse_job_args` and stops; so the job's config class and section are the job's own.
    Relative paths resolve against the current directory (the repo root, as under --working-dir).
    """
    from umarvel_ray.config import ConfigError, parse_job_args

    spec = importlib.util.spec_from_file_location(f"_manifest_job_{script.stem}", script)
    assert spec is not None and spec.loader is not None, f"cannot load {script}"
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def parse(cls, argv=None, description="", default_config=None, section=None):  # noqa: ANN001, ANN202
        try:
            cfg = parse_job_args(cls, argv, description, default_config, section)
        except (ConfigError, ValueError) as exc:
            raise _Parsed(cls, error=exc) from exc
        raise _Parsed(cls, cfg)

    def run_job(cls, run, argv=None, doc=None, section=None, needs_ray=False, check=None):  # noqa: ANN001, ANN202
        parse(cls, argv, doc or "", None, section)

    patched = [name for name, fake in (("run_job", run_job), ("parse_job_args", parse)) if hasattr(mod, name)]
    assert patched, f"{script.name} calls neither run_job nor parse_job_args"
    for name, fake in (("run_job", run_job), ("parse_job_args", parse)):
        if hasattr(mod, name):
            setattr(mod, name, fake)
    try:
        mod.main(args)
    except _Parsed as p:
        if p.error is not None:
            raise AssertionError(f"{script.name} {' '.join(args)}: {p.error}") from p.error
        return p.cfg
    raise AssertionError(f"{script.name} {' '.join(args)}: exited before parsing a config")


def entrypoint_configs(entrypoint: str, where: str) -> tuple[str, list[Any]]:
    """(job script name, resolved configs) of `python jobs/X.py ARGS`; train.py gives its stage
    configs, recipe.py the recipe config."""
    argv = shlex.split(entrypoint)
    assert len(argv) >= 2 and argv[0] == "python", f"{where}: entrypoint {entrypoint!r} is not `python jobs/X.py ...`"
    script = ROOT / argv[1]
    assert argv[1].startswith("jobs/") and script.is_file(), f"{where}: {argv[1]} does not exist"
    cfg = parse_job(script, argv[2:])
    if script.name != "train.py":
        return script.name, [cfg]
    from umarvel_ray.config import ConfigError
    from umarvel_ray.train.config import resolve_stages

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", default=None)
    stage = pre.parse_known_args(argv[2:])[0].stage
    try:
        return script.name, resolve_stages(cfg, stage)
    except ConfigError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


def stage_configs(recipe: Any) -> list[Any]:
    from umarvel_ray.recipe import Recipe
    from umarvel_ray.train.config import stage_config

    job = Recipe(recipe).train_job()
    return [stage_config(job, s) for s in recipe.train.stages]


def gpu_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker groups with GPUs: name, replicas (min, replicas, max), per-pod gpus and cpus."""
    out = []
    for g in cluster.get("workerGroupSpecs", []):
        (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        req, lim = c["resources"].get("requests", {}), c["resources"].get("limits", {})
        gpus = int(lim.get("nvidia.com/gpu", 0))
        assert int(req.get("nvidia.com/gpu", gpus)) == gpus, f"group {g['groupName']}: GPU request != limit"
        if gpus:
            out.append({"name": g["groupName"], "min": g["minReplicas"], "replicas": g["replicas"],
                        "max": g["maxReplicas"], "gpus": gpus, "cpus": float(lim["cpu"])})  # fmt: skip
    return out


def _trainers(script: str, cfgs: list[Any]) -> list[Any]:
    if script == "recipe.py":
        (recipe,) = cfgs
        return [*stage_configs(recipe), *([recipe.reranker] if "reranker" in recipe.steps else [])]
    return cfgs if script in ("train.py", "train_reranker.py") else []


def _actors(script: str, cfgs: list[Any]) -> list[Any]:
    (cfg,) = cfgs if script != "train.py" else (None,)
    return {
        "embed.py": lambda: [cfg],
        "mine_negatives.py": lambda: [cfg.embed],
        "teacher_scores.py": lambda: [cfg, cfg.embed],
        "evaluate.py": lambda: [cfg.embed],
        "recipe.py": lambda: [cfg.eval.embed, cfg.mine.embed, cfg.teacher, cfg.teacher.embed],
    }.get(script, lambda: [])()


def check_job_resources(spec: dict[str, Any], script: str, cfgs: list[Any], where: str) -> None:
    """The RayJob's GPUs are exactly what its Ray Train workers ask for (workers x 1 GPU), its pods
    hold a worker's CPUs, and embedding actors find their GPUs up when the job starts."""
    groups = gpu_groups(spec["rayClusterSpec"])
    assert groups, f"{where}: no GPU worker group"
    for g in groups:
        assert g["min"] == g["replicas"] == g["max"], (
            f"{where}: group {g['name']} is not fixed-size (min {g['min']}, replicas {g['replicas']}, max "
            f"{g['max']}): the job decides GPU use and actor counts from the GPUs up when it starts"
        )
    total = sum(g["max"] * g["gpus"] for g in groups)
    trainers = _trainers(script, cfgs)
    if trainers:
        need = max(t.workers if t.use_gpu else 0 for t in trainers)
        assert need == total, f"{where}: {total} GPUs for {need} GPU workers ({script})"
        for t in trainers:
            for g in groups:
                per_pod = t.cpus_per_worker * g["gpus"]
                assert per_pod <= g["cpus"], f"{where}: {g['gpus']} workers x {t.cpus_per_worker} CPUs > pod's {g['cpus']}"
    for a in _actors(script, cfgs):
        assert a.use_gpu in ("auto", "true"), f"{where}: {type(a).__name__}.use_gpu={a.use_gpu} on a GPU cluster"
        assert a.num_actors <= total, f"{where}: {a.num_actors} actors for {total} GPUs"
        for g in groups:
            assert a.actor_num_cpus * g["gpus"] <= g["cpus"], f"{where}: {g['gpus']} actors x {a.actor_num_cpus} CPUs > pod"
    for t in trainers:
        if t.deepspeed_config:
            assert Path(t.deepspeed_config).is_file(), f"{where}: deepspeed_config {t.deepspeed_config} does not exist"


def path_values(cfg: Any, where: str = "") -> list[tuple[str, str]]:
    """(field, value) of every set path field of a config tree (hub ids and '' left out)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += path_values(value, f"{where}{f.name}.")
        elif f.metadata.get("path") and isinstance(value, str) and value.startswith("/"):
            out.append((f"{where}{f.name}", value))
    return out


def mounts(pod_spec: dict[str, Any], container: str) -> list[str]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == container]
    return [m["mountPath"] for m in c.get("volumeMounts", [])]


def check_paths_mounted(values: list[tuple[str, str]], cluster: dict[str, Any], where: str) -> None:
    """Paths a job reads or writes lie on storage every pod mounts (or in the job's working dir)."""
    pods = [("ray-head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [("ray-worker", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    for name, value in values:
        if Path(value).is_relative_to(ROOT):
            continue  # the code's own files (working_dir)
        for container, pod in pods:
            ok = [m for m in mounts(pod, container) if Path(value).is_relative_to(m) and m != "/dev/shm"]
            assert ok, f"{where}: {name}={value} is on no volume mounted in {container}"


def check_job(doc: dict[str, Any], where: str) -> tuple[str, list[Any]]:
    """One RayJob against the code; returns (script, configs) for the chain check."""
    spec = doc["spec"]
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode"), f"{where}: submissionMode"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the job's cluster must go away when it ends"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert str(env["working_dir"]).endswith(".zip"), f"{where}: working_dir must be a zip URL the cluster can fetch"
    check_requirements([f'"{p}"' for p in env.get("pip", [])], where)
    script, cfgs = entrypoint_configs(spec["entrypoint"], where)
    check_job_resources(spec, script, cfgs, where)
    values = [v for c in (stage_configs(cfgs[0]) if script == "recipe.py" else cfgs) for v in path_values(c)]
    if script == "recipe.py":
        values += path_values(cfgs[0])
    check_paths_mounted(values, spec["rayClusterSpec"], where)
    return script, cfgs


def check_chain(parsed: dict[str, list[Any]]) -> None:
    """The per-step jobs hand their outputs to each other the way the recipe does."""
    stages = {c.stage: c for s in ("stage1", "stage2", "stage3", "stage4", "stage5") for c in parsed[s]}
    run = Path(stages["stage3"].run_dir)
    for a, b in (("stage1", "stage2"), ("stage2", "stage3"), ("stage3", "stage4"), ("stage4", "stage5")):
        assert stages[b].model == str(Path(stages[a].stage_dir) / "model"), f"{b} does not start from {a}'s model"
    (mine,), (reranker,), (teacher,) = parsed["mine"], parsed["reranker"], parsed["teacher"]
    (evaluate,), (embed,) = parsed["evaluate"], parsed["embed"]
    assert mine.model == str(run / "stage3" / "model"), "mine must embed with the stage-3 model"
    assert str(Path(mine.output_dir) / "negatives.jsonl") == stages["stage4"].negatives_file, "stage4 reads other negatives"
    (mine_reranker,) = parsed["mine-reranker"]
    assert mine_reranker.model == str(run / "stage3" / "model") and mine_reranker.pool == "local", (
        "the re-ranker's negatives come from the stage-3 model's local pools"
    )
    assert reranker.negatives_file == str(Path(mine_reranker.output_dir) / "negatives.jsonl"), (
        "the reranker reads other negatives"
    )
    assert teacher.model == str(run / "stage4" / "model"), "the teacher must retrieve with the stage-4 model"
    assert teacher.reranker == str(Path(reranker.output or Path(reranker.run_dir) / "reranker") / "model"), "teacher's reranker"
    assert str(Path(teacher.output_dir) / "teacher.jsonl") == stages["stage5"].teacher_file, "stage5 reads other scores"
    assert evaluate.model == embed.model == str(run / "stage5" / "model"), "evaluate/embed must use the final model"


# ------------------------------------------------------------------------------------ serve


def check_service(doc: dict[str, Any], serve_config_text: str, where: str, monkeypatch: Any) -> None:
    """serveConfigV2 = serve_config.yaml (host aside); import path and args load; GPU group sized
    for the GPU replicas (min..max), pods hold a replica's CPUs; args' paths are mounted."""
    from umarvel_ray.serve import app as serve_app

    spec = doc["spec"]
    served = yaml.safe_load(spec["serveConfigV2"])
    expected = yaml.safe_load(serve_config_text)
    assert served["http_options"]["host"] == "0.0.0.0", f"{where}: the proxy must listen beyond loopback in a pod"
    served["http_options"]["host"] = expected["http_options"]["host"]
    assert served == expected, f"{where}: serveConfigV2 differs from cluster/serve_config.yaml"
    cluster = spec["rayClusterConfig"]
    (group,) = gpu_groups(cluster)
    assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: Serve autoscaling needs the Ray autoscaler"
    monkeypatch.setattr(serve_app, "_cluster_has_gpus", lambda: True)
    for app in served["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr, None)
        assert callable(builder), f"{where}: import_path {app['import_path']} does not name a callable"
        try:
            cfg = serve_app.serve_config(dict(app.get("args", {})))
        except ValueError as exc:  # ConfigError, pydantic's ValidationError
            raise AssertionError(f"{where}: args of {app['name']}: {exc}") from exc
        parts = [cfg.embedder] + ([cfg.reranker] if cfg.reranker_dir else []) + [cfg.retriever]
        opts = [serve_app.deployment_options(s) for s in parts[:-1]] + [
            {**serve_app.deployment_options(parts[-1]), "ray_actor_options": {"num_cpus": parts[-1].num_cpus, "num_gpus": 0}}
        ]
        gpu_min = sum(s.min_replicas * o["ray_actor_options"]["num_gpus"] for s, o in zip(parts, opts, strict=True))
        gpu_max = sum(s.max_replicas * o["ray_actor_options"]["num_gpus"] for s, o in zip(parts, opts, strict=True))
        cpu_min = sum(s.min_replicas * s.num_cpus for s in parts)
        assert group["min"] * group["gpus"] == gpu_min >= 1, f"{where}: {group['min']} GPU pods for {gpu_min} GPU replicas"
        assert group["max"] * group["gpus"] == gpu_max, f"{where}: up to {group['max']} GPU pods for {gpu_max} replicas"
        assert cpu_min <= group["min"] * group["cpus"], f"{where}: {cpu_min} CPUs of replicas on {group['min']} pods"
        assert all(s.num_cpus <= group["cpus"] for s in parts), f"{where}: a replica needs more CPUs than a pod has"
        check_paths_mounted(path_values(cfg), cluster, where)
