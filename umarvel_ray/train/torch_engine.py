"""One-process training engine in plain PyTorch with the interface `embedder.train_step` drives.

`train_step` calls `engine(batch)`, `engine.backward(loss)`, `set_gradient_accumulation_boundary`,
`step()`, `zero_optimization_stage()`, `get_global_grad_norm()` and reads `engine.module`: the
DeepSpeed engine's interface. This engine provides it without DeepSpeed (or Ray), for one process:
the GPU check's machine has neither, and `jobs/bench_train.py --engine torch` times the same step
there. Like DeepSpeed's bf16 mode it casts the module to bf16 and keeps fp32 master copies of the
trainable parameters; AdamW updates the masters after global-norm clipping. No ZeRO partitioning
(one process holds everything) and no learning-rate schedule (the rate is constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class TorchEngine:
    """AdamW + clipping over `module`'s trainable parameters, fp32 masters when `bf16`."""

    def __init__(
        self, module: nn.Module, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0, bf16: bool = False
    ) -> None:
        self.module = module.to(torch.bfloat16) if bf16 else module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("TorchEngine: the module has no trainable parameters")
        self.masters = (
            [p.detach().float().clone().requires_grad_(True) for p in self.params] if bf16 else self.params
        )
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self._norm: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """Accumulate gradients (one optimizer step per `step()`, however many backward calls)."""
        loss.backward()

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """No-op: gradients accumulate in `.grad` until `step()` applies them."""

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self) -> float | None:
        """Pre-clip L2 norm of all gradients at the last `step()`."""
        return self._norm

    def step(self) -> None:
        if self.masters is not self.params:
            for m, p in zip(self.masters, self.params, strict=True):
                m.grad = None if p.grad is None else p.grad.detach().float()
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.masters, clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                for m, p in zip(self.masters, self.params, strict=True):
                    p.copy_(m)
