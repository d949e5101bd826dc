"""Every cluster manifest agrees with the code: generated files are current, entrypoints name jobs
that exist and whose arguments parse into the job's own config, GPU counts match the configs,
the RayService's Serve config is cluster/serve_config.yaml and loads into the app, and every image,
rayVersion and pip pin names pyproject's Ray. Each check also runs on a broken copy, which must fail."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import manifest_checks as mc  # noqa: E402

ROOT = mc.ROOT
KUBERAY = ROOT / "cluster" / "kuberay"
SERVE_CONFIG = ROOT / "cluster" / "serve_config.yaml"


def _generator():
    spec = importlib.util.spec_from_file_location("make_manifests", KUBERAY / "make_manifests.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _manifests() -> dict[str, list[dict]]:
    files = sorted(KUBERAY.glob("*.yaml")) + sorted((KUBERAY / "jobs").glob("*.yaml"))
    return {str(p.relative_to(ROOT)): [d for d in yaml.safe_load_all(p.read_text()) if d] for p in files}


def _jobs() -> dict[str, dict]:
    return {
        where: doc for where, docs in _manifests().items() for doc in docs if doc["kind"] == "RayJob"
    }


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Jobs resolve relative paths against their working dir: the repo root under --working-dir."""
    monkeypatch.chdir(ROOT)


def test_generated_manifests_are_current():
    rendered = _generator().render()
    for path, text in rendered.items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run python cluster/kuberay/make_manifests.py"
        )
    extra = set((KUBERAY / "jobs").glob("*.yaml")) - set(rendered)
    assert not extra, f"job manifests the generator does not make: {sorted(extra)}"


def test_every_manifest_has_the_expected_kinds():
    kinds = [d["kind"] for docs in _manifests().values() for d in docs]
    assert kinds.count("RayService") == 1 and kinds.count("RayCluster") == 1
    assert kinds.count("PersistentVolumeClaim") == 1
    steps = {d["metadata"]["labels"]["umarvel-ray/step"] for d in _jobs().values()}
    expected = {f"stage{i}" for i in range(1, 6)} | {"mine", "mine-reranker", "reranker", "teacher", "evaluate", "embed", "recipe"}
    assert steps == expected


def test_ray_version_everywhere_is_pyprojects():
    pin = mc.ray_pin()
    for where, docs in _manifests().items():
        for doc in docs:
            mc.check_versions(doc, pin, where)
    launcher = yaml.safe_load((ROOT / "cluster" / "ray_up_gpu.yaml").read_text())
    mc.check_image(launcher["docker"]["image"], pin, "ray_up_gpu.yaml docker.image")
    mc.check_requirements(launcher.get("setup_commands") or [], "ray_up_gpu.yaml setup_commands")
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    (base,) = [ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("FROM ")]
    assert base.startswith("rayproject/ray:"), base
    mc.check_image(base, pin, "cluster/Dockerfile FROM")
    mc.check_requirements([dockerfile], "cluster/Dockerfile")
    torch_pin = next(w for w in (ROOT / "cluster" / "setup_local.sh").read_text().split() if w.startswith("torch=="))
    assert f'"{torch_pin}"' in dockerfile, f"the image's torch is not setup_local.sh's {torch_pin}"


def test_ray_up_launcher_holds_the_paper_preset():
    from umarvel_ray.config import load_config
    from umarvel_ray.recipe import RecipeConfig

    launcher = yaml.safe_load((ROOT / "cluster" / "ray_up_gpu.yaml").read_text())
    recipe = load_config(RecipeConfig, "jobs/configs/paper_qwen2vl7b.yaml")
    need = max(t.workers for t in [*mc.stage_configs(recipe), recipe.reranker] if t.use_gpu)
    types = launcher["available_node_types"]
    gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert gpus >= need, f"ray up can reach {gpus} GPUs, the paper preset trains on {need}"
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_raycluster_autoscales_a_gpu_group():
    (doc,) = _manifests()["cluster/kuberay/raycluster.yaml"]
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    (group,) = mc.gpu_groups(spec)
    assert group["min"] == group["replicas"] == 0 < group["max"]
    assert group["max"] * group["gpus"] >= 64, "the paper preset's 64 workers must fit at full scale"


def test_rayjobs_agree_with_the_code():
    parsed = {}
    for where, doc in _jobs().items():
        _, cfgs = mc.check_job(doc, where)
        parsed[doc["metadata"]["labels"]["umarvel-ray/step"]] = cfgs
    mc.check_chain(parsed)
    (recipe,) = parsed["recipe"]
    assert [c.stage for c in mc.stage_configs(recipe)] == [f"stage{i}" for i in range(1, 6)]


def test_rayservice_agrees_with_serve_config_and_the_app(monkeypatch):
    (doc,) = _manifests()["cluster/kuberay/rayservice.yaml"]
    assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    mc.check_service(doc, SERVE_CONFIG.read_text(), "rayservice.yaml", monkeypatch)


# ------------------------------------------------------------------------------------ broken copies


def _job(step: str) -> tuple[str, dict]:
    (item,) = [(w, copy.deepcopy(d)) for w, d in _jobs().items() if d["metadata"]["labels"]["umarvel-ray/step"] == step]
    return item


def _worker(spec: dict) -> dict:
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


JOB_BREAKS = {
    "missing script": ("stage3", lambda s: s.update(entrypoint=s["entrypoint"].replace("train.py", "trian.py")),
                       "does not exist"),
    "unknown key": ("mine", lambda s: s.update(entrypoint=s["entrypoint"] + " depthh=5"), "unknown key"),
    "bad stage key": ("stage3", lambda s: s.update(entrypoint=s["entrypoint"] + " stage3.lora_rr=8"), "unknown key"),
    "too few GPUs": ("stage3", lambda s: _worker(s).update(replicas=7, minReplicas=7, maxReplicas=7), "GPUs for 64"),
    "too many GPUs": ("reranker", lambda s: _worker(s).update(replicas=9, minReplicas=9, maxReplicas=9), "GPUs for 64"),
    "autoscaled embed": ("embed", lambda s: _worker(s).update(replicas=0, minReplicas=0), "not fixed-size"),
    "cpu embed": ("embed", lambda s: s.update(entrypoint=s["entrypoint"].replace("use_gpu=true", "use_gpu=false")),
                  "use_gpu=false"),
    "small pod": ("stage1", lambda s: _worker(s)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="32"),
                  "CPUs > pod"),
    "missing deepspeed json": ("stage2", lambda s: s.update(
        entrypoint=s["entrypoint"] + " common.deepspeed_config=cluster/deepspeed/zero9.json"), "does not exist"),
    "unmounted run_dir": ("teacher", lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                          .update(volumeMounts=[]), "no volume mounted in ray-head"),
    "path off the volume": ("evaluate", lambda s: s.update(entrypoint=s["entrypoint"] + " out_dir=/tmp/eval"),
                            "out_dir=/tmp/eval is on no volume"),
    "no shutdown": ("stage4", lambda s: s.update(shutdownAfterJobFinishes=False), "must go away"),
    "other deepspeed pin": ("stage5", lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"] + "pip: ['deepspeed==0.1.0']\n"),
                            "pyproject has deepspeed==0.19.8"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(JOB_BREAKS))
def test_a_broken_rayjob_fails(name):
    step, breaker, message = JOB_BREAKS[name]
    where, doc = _job(step)
    breaker(doc["spec"])
    with pytest.raises(AssertionError, match=message):
        mc.check_job(doc, where)


def test_a_broken_chain_fails():
    parsed = {}
    for where, doc in _jobs().items():
        step = doc["metadata"]["labels"]["umarvel-ray/step"]
        if step == "mine":
            doc = copy.deepcopy(doc)
            doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("/negatives", "/negs")
        parsed[step] = mc.check_job(doc, where)[1]
    with pytest.raises(AssertionError, match="stage4 reads other negatives"):
        mc.check_chain(parsed)


def test_a_wrong_ray_version_fails():
    (doc,) = _manifests()["cluster/kuberay/raycluster.yaml"]
    bad = copy.deepcopy(doc)
    bad["spec"]["rayVersion"] = "2.59.0"
    with pytest.raises(AssertionError, match="rayVersion"):
        mc.check_versions(bad, mc.ray_pin(), "raycluster")
    bad = copy.deepcopy(doc)
    container = bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["image"] = container["image"].replace("2.60.0", "2.59.0")
    with pytest.raises(AssertionError, match="not tagged with Ray"):
        mc.check_versions(bad, mc.ray_pin(), "raycluster")
    with pytest.raises(AssertionError, match="pyproject has ray==2.60.0"):
        mc.check_requirements(['pip install "ray[serve]==2.59.0"'], "setup")


def _service_breaks() -> dict:
    def arg(key, value):
        def f(doc):
            cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
            cfg["applications"][0]["args"][key] = value
            cfg["http_options"]["host"] = "0.0.0.0"
            doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
        return f

    def group(**kw):
        return lambda doc: doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(**kw)

    def serve_config_arg(key, value):  # the same change made to serve_config.yaml too
        def text(t):
            cfg = yaml.safe_load(t)
            cfg["applications"][0]["args"][key] = value
            return yaml.safe_dump(cfg)
        return text

    return {
        "drifted args": (arg("fusion_weight", 2.0), None, "differs from cluster/serve_config.yaml"),
        "loopback": (lambda d: d["spec"].update(serveConfigV2=d["spec"]["serveConfigV2"].replace("0.0.0.0", "127.0.0.1")),
                     None, "beyond loopback"),
        "unknown arg": (arg("embedder.max_batch_sizee", 4), serve_config_arg("embedder.max_batch_sizee", 4), "unknown key"),
        "bad import path": (lambda d: d["spec"].update(serveConfigV2=d["spec"]["serveConfigV2"].replace(":build_app", ":nope")),
                            lambda t: t.replace(":build_app", ":nope"), "does not name a callable"),
        "too few GPU pods": (group(maxReplicas=2), None, "for 3 replicas"),
        "no GPU at start": (group(minReplicas=1, replicas=1), None, "for 2 GPU replicas"),
        "more replicas": (arg("embedder.max_replicas", 4), serve_config_arg("embedder.max_replicas", 4), "for 5 replicas"),
        "unmounted model": (arg("model_dir", "/opt/models/x"), serve_config_arg("model_dir", "/opt/models/x"),
                            "model_dir=/opt/models/x is on no volume"),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(_service_breaks()))
def test_a_broken_rayservice_fails(name, monkeypatch):
    breaker, text_breaker, message = _service_breaks()[name]
    (doc,) = _manifests()["cluster/kuberay/rayservice.yaml"]
    doc = copy.deepcopy(doc)
    breaker(doc)
    text = SERVE_CONFIG.read_text()
    with pytest.raises(AssertionError, match=message):
        mc.check_service(doc, text_breaker(text) if text_breaker else text, "rayservice.yaml", monkeypatch)
