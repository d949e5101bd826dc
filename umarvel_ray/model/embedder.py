"""The U-MARVEL bi-encoder: a Qwen2-VL decoder read out by masked mean pooling, L2-normalised.

Attention is bidirectional through an explicit 4-D additive mask passed in every batch (upstream
code silently falls back to causal attention when a batch happens to have no padding; we never
rely on `is_causal` defaults). The pool excludes pads and, by default, the instruction span
(markers included) while the instruction still takes part in attention. Only the decoder is run
(`model.model`), never the LM head, so no vocabulary-sized logits are computed.

Training constructor `Embedder.build` puts a fresh LoRA on every Linear of the language model
(vision tower and merger frozen); inference constructor `Embedder.load` reads a merged directory or
base + adapter; `merge_and_save` writes a plain HF checkpoint that the next stage builds on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.model.inputs import EMB_TOKEN, Collator, InputConfig, attention_bias, ensure_added_tokens
from umarvel_ray.model.pixels import model_pixel_values, use_frame_patch_embed
from umarvel_ray.model.saved import EMBEDDER_META_FILE, read_saved_meta, saved_config

META_FILE = EMBEDDER_META_FILE
# LoRA targets: every Linear of the language model's decoder layers, nothing in `visual`.
LM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class LoraConfig:
    """LoRA settings (the recipe: r/alpha 64/128 in stage 1, 128/256 later, dropout 0.05)."""

    enabled: bool = field(default=True, metadata={"help": "LoRA on the LLM; False = full LLM fine-tuning"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: int = field(default=128, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})


@dataclass
class EmbedderConfig:
    """Everything that defines how an embedding is computed (saved next to merged weights)."""

    model: str = field(default="Qwen/Qwen2-VL-7B-Instruct", metadata={"path": "model", "help": "HF id or local path"})
    inputs: InputConfig = field(default_factory=InputConfig)
    attention: str = field(default="bidirectional", metadata={"help": "bidirectional or causal"})
    pooling: str = field(default="mean", metadata={"help": "mean (masked) or last (<emb> / last token)"})
    pool_instruction: bool = field(default=False, metadata={"help": "include instruction tokens in the pool"})
    tau_init: float = field(default=0.05, metadata={"help": "initial InfoNCE temperature"})
    learn_tau: bool = field(default=False, metadata={"help": "train log(tau) (stage 3 on)"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = field(default=False, metadata={"help": "non-reentrant checkpointing"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or auto (bf16 on CUDA)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager (4-D masks)"})

    def __post_init__(self) -> None:
        if self.attention not in ("bidirectional", "causal"):
            raise ValueError(f"attention must be bidirectional or causal, got {self.attention!r}")
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be mean or last, got {self.pooling!r}")
        if self.attn_implementation == "flash_attention_2":
            raise ValueError("flash_attention_2 ignores 4-D masks; use sdpa (or eager)")
        if self.tau_init <= 0:
            raise ValueError("tau_init must be positive")


def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """Non-reentrant activation checkpointing under the 5.x name, falling back to the older one."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def saved_embedder_config(
    model: str | Path, adapter: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> EmbedderConfig:
    """The `EmbedderConfig` that `Embedder.load(model, adapter, cfg_overrides=overrides)` resolves,
    read without loading weights (`model.saved.saved_config`)."""
    return saved_config(EmbedderConfig, META_FILE, model, adapter, overrides)


class Embedder(nn.Module):
    """Qwen2-VL bi-encoder with a learnable temperature. Use `build` (training) or `load` (inference)."""

    def __init__(self, model: Any, processor: Any, cfg: EmbedderConfig, tau: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.cfg = cfg
        start = math.log(tau if tau is not None else cfg.tau_init)
        self.log_tau = nn.Parameter(torch.tensor(start, dtype=torch.float32), requires_grad=cfg.learn_tau)
        self.collator = Collator(
            processor.tokenizer,
            processor.image_processor,
            cfg.inputs,
            pool_instruction=cfg.pool_instruction,
            chat_template=getattr(processor, "chat_template", None),
        )
        self.emb_token_id = processor.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        self.one_frame = False  # still images as one frame per patch (`load` sets it; inference only)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def build(cls, cfg: EmbedderConfig) -> Embedder:
        """Training: base weights frozen, fresh LoRA on the language model's Linears (or full LLM)."""
        from umarvel_ray.model.backbone import load_backbone

        model, processor = load_backbone(
            cfg.model, dtype=cfg.dtype, for_generation=False, attn_implementation=cfg.attn_implementation
        )
        ensure_added_tokens(processor.tokenizer, model)
        model.requires_grad_(False)
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            peft_cfg = PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=LM_LORA_TARGETS,
                bias="none",
            )
            model = get_peft_model(model, peft_cfg)
        else:
            model.model.language_model.requires_grad_(True)
        emb = cls(model, processor, cfg)
        if cfg.gradient_checkpointing:
            emb.set_gradient_checkpointing(True)
        emb.train()
        return emb

    @classmethod
    def load(
        cls,
        path_or_base: str | Path,
        adapter: str | Path | None = None,
        cfg_overrides: dict[str, Any] | list[str] | None = None,
    ) -> Embedder:
        """Inference: a merged dir (with umarvel_embedder.json) or base + PEFT adapter dir, merged.

        The config comes from the adapter's (else the model dir's) umarvel_embedder.json, then
        `cfg_overrides` (a nested dict or `a.b=value` strings); `model` is set to `path_or_base`.
        """
        from umarvel_ray.model.backbone import load_backbone

        meta = read_saved_meta(META_FILE, adapter, path_or_base)
        cfg = saved_embedder_config(path_or_base, adapter, cfg_overrides)
        model, processor = load_backbone(
            cfg.model, dtype=cfg.dtype, for_generation=False, attn_implementation=cfg.attn_implementation
        )
        ensure_added_tokens(processor.tokenizer, model)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.requires_grad_(False)
        emb = cls(model, processor, cfg, tau=meta.get("tau"))
        emb.one_frame = use_frame_patch_embed(model)
        emb.log_tau.requires_grad_(False)
        emb.eval()
        return emb

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict[str, Any]:
        from umarvel_ray.config import to_dict

        return {
            "config": to_dict(self.cfg),
            "tau": float(self.tau.detach()),
            "dim": self.dim,
            "format_version": 1,
        }

    def save_adapter(self, out_dir: str | Path) -> Path:
        """PEFT adapter + umarvel_embedder.json (cfg.model = the base it applies to); cheap checkpoints."""
        if not self.is_peft:
            raise ValueError("save_adapter needs a LoRA embedder; use merge_and_save for full weights")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(self._meta(), indent=2))
        return out

    def merge_and_save(self, out_dir: str | Path) -> Path:
        """Merge LoRA into the weights IN PLACE (this embedder keeps working, now without LoRA)
        and write a plain HF dir + processor (with the added tokens) + umarvel_embedder.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            self.model = self.model.merge_and_unload()
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        meta = self._meta()
        meta["config"]["model"] = str(out)
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out

    # ------------------------------------------------------------------ properties
    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def tau(self) -> torch.Tensor:
        """InfoNCE temperature exp(log_tau) (a scalar tensor carrying gradients when learned)."""
        return self.log_tau.exp()

    @property
    def dim(self) -> int:
        return int(self.base_model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return self._param().device

    @property
    def dtype(self) -> torch.dtype:
        return self._param().dtype

    @property
    def base_model(self) -> Any:
        """The `...ForConditionalGeneration` module (inside any PEFT wrapper)."""
        return self.model.get_base_model() if self.is_peft else self.model

    def _param(self) -> torch.Tensor:
        return self.base_model.get_input_embeddings().weight

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant checkpointing (works with frozen inputs, LoRA and DeepSpeed)."""
        set_activation_checkpointing(self.base_model, enabled)
        self.cfg.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ batches
    def collate(self, items: list[dict[str, Any]], is_query: bool) -> dict[str, torch.Tensor]:
        """CPU tensors for `forward`; see `inputs.Collator`."""
        return self.collator(items, is_query=is_query)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states (B, L, H) of the decoder under the configured attention mask."""
        device = self.device
        b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        attn = b["attention_mask"]
        position_ids = b.get("position_ids")
        if position_ids is None:
            position_ids = self._positions(b)
        mask4d = attention_bias(attn, causal=self.cfg.attention == "causal", dtype=self.dtype)
        decoder = self.base_model.model
        out = decoder(
            input_ids=b["input_ids"],
            attention_mask=mask4d,
            position_ids=position_ids,
            pixel_values=model_pixel_values(
                b, self.collator.pixel_layout, self.dtype, one_frame=self.one_frame and not self.training
            ),
            image_grid_thw=b.get("image_grid_thw"),
            mm_token_type_ids=b.get("mm_token_type_ids"),
            use_cache=False,
            return_dict=True,
        )
        return out.last_hidden_state

    def _positions(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids for hand-built batches: the model's rope helper with images, cumsum without."""
        attn = b["attention_mask"]
        if b.get("image_grid_thw") is not None:
            pos, _ = self.base_model.model.get_rope_index(
                b["input_ids"],
                b["mm_token_type_ids"],
                image_grid_thw=b["image_grid_thw"],
                attention_mask=attn,
            )
            return pos
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1)

    def pool(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked mean over `pool_mask` (fp32), or the hidden state at the <emb>/last real token."""
        hidden = hidden.float()
        if self.cfg.pooling == "mean":
            w = batch["pool_mask"].to(hidden.device, torch.float32).unsqueeze(-1)
            return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        ids = batch["input_ids"].to(hidden.device)
        attn = batch["attention_mask"].to(hidden.device).bool()
        idx = torch.arange(ids.shape[1], device=hidden.device).expand_as(ids)
        last_real = torch.where(attn, idx, -1).max(1).values
        last_emb = torch.where(attn & (ids == self.emb_token_id), idx, -1).max(1).values
        pick = torch.where(last_emb >= 0, last_emb, last_real)
        return hidden[torch.arange(ids.shape[0], device=hidden.device), pick]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) float32 L2-normalised embeddings; the batch is moved to the model's device."""
        hidden = self.hidden_states(batch)
        return nn.functional.normalize(self.pool(hidden, batch), dim=-1)

    # ------------------------------------------------------------------ inference helpers
    def encode(self, items: list[dict[str, Any]], is_query: bool, batch_size: int = 32) -> Any:
        """Embeddings of `items` as a float32 numpy array (N, D), in input order."""
        import numpy as np

        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(items), batch_size):
                    batch = self.collate(items[i : i + batch_size], is_query=is_query)
                    out.append(self(batch).float().cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out, axis=0).astype(np.float32, copy=False)

    def encode_queries(self, items: list[dict[str, Any]], batch_size: int = 32) -> Any:
        """Query embeddings (instructions kept, wrapped in the markers, excluded from the pool)."""
        return self.encode(items, is_query=True, batch_size=batch_size)

    def encode_candidates(self, items: list[dict[str, Any]], batch_size: int = 32) -> Any:
        """Candidate embeddings (no instruction)."""
        return self.encode(items, is_query=False, batch_size=batch_size)
