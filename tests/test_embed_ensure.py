"""`embed.ensure`: the one "already embedded?" rule, checked without Ray or a model.

A directory is reused exactly when its manifest is complete and records the settings that
`run_embedding` would record for the config; any other directory goes to `run_embedding` (here a
stand-in model directory without weights, so a call to it would fail loudly).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from umarvel_ray.config import ConfigError
from umarvel_ray.embed import ensure
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.embed.ensure import embedding_settings, ensure_embeddings, why_not_reusable
from umarvel_ray.store import write_manifest


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    root = tmp_path / "data"
    root.mkdir()
    pool = root / "pool.jsonl"
    rows = [{"did": f"1:{i}", "txt": f"caption {i}", "img_path": None, "modality": "text"} for i in range(3)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"  # validate_config needs a directory; nothing here loads it
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "emb"
    cfg = EmbedConfig(input=str(pool), data_root=str(root), model=str(model), output_dir=str(out))
    return {"root": root, "pool": pool, "model": model, "out": out, "cfg": cfg}


def _complete(out: Path, cfg: EmbedConfig, kind: str = "candidate") -> None:
    write_manifest(out, {"kind": kind, "complete": True, "settings": embedding_settings(cfg)})


def test_reused_only_when_complete_with_the_same_settings(setup, monkeypatch):
    cfg, out = setup["cfg"], setup["out"]
    assert why_not_reusable(cfg) == "no complete manifest"
    _complete(out, cfg)
    assert why_not_reusable(cfg) is None
    assert "text_rule" in why_not_reusable(dataclasses.replace(cfg, text_rule="none"))
    assert "shard_rows" in why_not_reusable(dataclasses.replace(cfg, shard_rows=2))
    assert "model_dtype" in why_not_reusable(dataclasses.replace(cfg, dtype="bfloat16"))
    assert why_not_reusable(dataclasses.replace(cfg, batch_size=7)) is None  # does not change vectors
    write_manifest(out, {"kind": "query", "complete": True, "settings": embedding_settings(cfg)})
    assert why_not_reusable(cfg) == "holds query embeddings"
    _complete(out, cfg)

    calls = []
    monkeypatch.setattr(ensure, "run_embedding", lambda c: calls.append(c) or "ran")
    args = dict(kind="candidate", input_path=setup["pool"], data_root=setup["root"], model=str(setup["model"]),
                adapter=None, output_dir=out)
    template = EmbedConfig(batch_size=7)  # the step fills input/data_root/kind/model/adapter/output_dir
    assert ensure_embeddings(template, **args) == (out, None) and not calls
    # Other input bytes, other weights: embedded again.
    extra = {"did": "1:9", "txt": "x", "img_path": None, "modality": "text"}
    setup["pool"].write_text(setup["pool"].read_text() + json.dumps(extra) + "\n")
    assert "input_sha256" in why_not_reusable(cfg)
    assert ensure_embeddings(template, **args) == (out, "ran") and calls[-1].input == str(setup["pool"])
    _complete(out, cfg)
    (setup["model"] / "model.safetensors").write_bytes(b"new weights")
    assert "model_signature" in why_not_reusable(cfg)
    # reuse=False: whatever is there is discarded, then embedded anew.
    _complete(out, cfg)
    assert ensure_embeddings(template, **args, reuse=False) == (out, "ran") and not out.exists()


def test_without_a_model_any_complete_directory_of_the_kind_is_used(setup):
    cfg, out = setup["cfg"], setup["out"]
    args = dict(input_path=setup["pool"], data_root=setup["root"], model="", adapter=None, output_dir=out)
    with pytest.raises(ConfigError, match="holds no complete candidate embeddings"):
        ensure_embeddings(EmbedConfig(), kind="candidate", **args)
    _complete(out, cfg)
    assert ensure_embeddings(EmbedConfig(), kind="candidate", **args) == (out, None)
    with pytest.raises(ConfigError, match="holds candidate embeddings, expected query"):
        ensure_embeddings(EmbedConfig(), kind="query", **args)
