"""TorchEngine runs `train_step` without DeepSpeed: the same gradients, norm and AdamW update as plain
PyTorch on a copy of the module; in bf16 the module is bf16 and fp32 masters take the update."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from umarvel_ray.model.embedder import Embedder, EmbedderConfig, LoraConfig
from umarvel_ray.model.losses import stable_id
from umarvel_ray.train.config import TrainConfig
from umarvel_ray.train.embedder import TrainModule, make_loss_fn, train_step
from umarvel_ray.train.torch_engine import TorchEngine

WORDS = ["red", "circle", "left", "of", "a", "blue", "square", "above", "two", "green", "stars"]


def _batch(emb, n: int = 4):
    queries = [{"text": " ".join(WORDS[i:] + WORDS[:i]), "image": None, "instruction": "Find it."} for i in range(n)]
    cands = [{"text": " ".join(reversed(WORDS[i:] + WORDS[:i])), "image": None, "instruction": None} for i in range(n)]
    return SimpleNamespace(
        chunks={"query": [emb.collate(queries, True)], "positive": [emb.collate(cands, False)]},
        pos_ids=torch.tensor([stable_id(f"p{i}") for i in range(n)]),
        neg_ids=None,
        query_ids=torch.tensor([stable_id(f"q{i}") for i in range(n)]),
        scores=None,
        cand_mask=None,
    )


def _module(tiny_model_dir) -> TrainModule:
    torch.manual_seed(0)
    emb = Embedder.build(EmbedderConfig(model=str(tiny_model_dir), learn_tau=True, lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    return TrainModule(emb.train())


def test_step_equals_plain_pytorch(tiny_model_dir):
    module = _module(tiny_model_dir)
    reference = copy.deepcopy(module)
    cfg = TrainConfig(data_kind="nli", per_device_batch=4, lr=1e-2, grad_clip=0.5, weight_decay=0.1)
    batch = _batch(module.embedder)
    engine = TorchEngine(module, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    out, norm = train_step(engine, batch, make_loss_fn(cfg, batch))

    embs, tau = {}, None
    for role, chunks in batch.chunks.items():
        embs[role], tau = reference(chunks[0])
    expected = make_loss_fn(cfg, batch)(embs, tau)
    expected.backward_loss.backward()
    params = [p for p in reference.parameters() if p.requires_grad]
    expected_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.step()

    assert float(out.loss) == pytest.approx(float(expected.loss.detach()), rel=1e-6)
    assert norm == pytest.approx(expected_norm, rel=1e-5) and norm > cfg.grad_clip  # clipping was active
    trained = dict(module.named_parameters())
    changed = 0
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6)
        changed += p.requires_grad
    assert changed > 0 and all(p.grad is None for p in module.parameters())


def _bf16_step(tiny_model_dir, device: str) -> None:
    module = _module(tiny_model_dir).to(device)
    cfg = TrainConfig(data_kind="nli", per_device_batch=4, lr=1e-2)
    batch = _batch(module.embedder)
    engine = TorchEngine(module, lr=cfg.lr, bf16=True)
    before = [m.detach().clone() for m in engine.masters]
    out, norm = train_step(engine, batch, make_loss_fn(cfg, batch))
    assert torch.isfinite(out.loss) and norm > 0
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert all(m.dtype == torch.float32 for m in engine.masters)
    assert any(not torch.equal(b, m) for b, m in zip(before, engine.masters, strict=True))
    for m, p in zip(engine.masters, engine.params, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_bf16_keeps_fp32_masters(tiny_model_dir):
    _bf16_step(tiny_model_dir, "cpu")


@pytest.mark.gpu
def test_bf16_step_on_cuda(tiny_model_dir):
    _bf16_step(tiny_model_dir, "cuda")
