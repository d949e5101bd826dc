"""Pointwise multimodal judge: P(Yes) that a candidate meets a query (U-MARVEL re-ranker).

A separate Qwen2-VL run causally with its LM head. The pair is rendered as one user turn
    "Does the candidate meet the query? Answer Yes or No."
    "\\nQuery: " [image] [instruction "\\n"] text  "\\nCandidate: " [image] text
followed by the assistant prompt; the score is softmax over the logits of the two answer tokens
at the first answer position, i.e. P(Yes). `judge="true_false"` switches to MM-Embed's zero-shot
"True or False" prompt and scores P(True). Training uses the same rendering with the answer token
appended and labels on that token only (-100 elsewhere), so SFT and scoring read the same position.
Only the decoder plus one LM-head row lookup per item is computed (no vocabulary-wide logits over
the whole sequence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.model.embedder import LM_LORA_TARGETS, LoraConfig, set_activation_checkpointing
from umarvel_ray.model.inputs import Collator, InputConfig, _clean, attention_bias, pad_rendered
from umarvel_ray.model.pixels import model_pixel_values, use_frame_patch_embed
from umarvel_ray.model.saved import RERANKER_META_FILE, saved_config

META_FILE = RERANKER_META_FILE
JUDGES: dict[str, dict[str, str]] = {
    "yes_no": {"prompt": "Does the candidate meet the query? Answer Yes or No.", "pos": "Yes", "neg": "No"},
    "true_false": {
        "prompt": "Does the candidate match the query? Answer True or False.",
        "pos": "True",
        "neg": "False",
    },
}
_Q = "\x00UMARVEL_QUERY_TEXT\x00"
_C = "\x00UMARVEL_CANDIDATE_TEXT\x00"
IGNORE_INDEX = -100


@dataclass
class RerankerConfig:
    """Judge settings (saved next to merged weights)."""

    model: str = field(default="Qwen/Qwen2-VL-7B-Instruct", metadata={"path": "model", "help": "HF id or local path"})
    judge: str = field(default="yes_no", metadata={"help": "yes_no (U-MARVEL) or true_false (MM-Embed)"})
    inputs: InputConfig = field(
        default_factory=lambda: InputConfig(max_text_tokens=240),
        metadata={"help": "system prompt, text truncation (per side), pixel budget, padding"},
    )
    include_instruction: bool = field(default=True, metadata={"help": "show the query instruction"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = field(default=False, metadata={"help": "non-reentrant checkpointing"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or auto (bf16 on CUDA)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager"})

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {sorted(JUDGES)}, got {self.judge!r}")


class RerankCollator(Collator):
    """(query, candidate) pairs -> batch; with `labels` it appends the answer token and labels it.

    Extra keys beyond `Collator`: `answer_index` (B,) = position whose next-token logits give the
    answer, and for training `labels` (B, L) with the answer token id at the answer position + 1.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, cfg: RerankerConfig, chat_template: str | None):
        judge = JUDGES[cfg.judge]
        self.judge = judge
        self.include_instruction = cfg.include_instruction
        super().__init__(tokenizer, image_processor, cfg.inputs, True, chat_template, require_markers=False)
        if not self.chat_template:
            raise ValueError("the reranker needs a chat template on the tokenizer/processor")
        self.answer_ids = (single_token_id(tokenizer, judge["pos"]), single_token_id(tokenizer, judge["neg"]))

    def _template(self, q_image: bool, c_image: bool) -> list[str]:
        key = ("rerank", q_image, c_image)
        pieces = self._template_cache.get(key)
        if pieces is None:
            content: list[dict[str, str]] = [{"type": "text", "text": self.judge["prompt"] + "\nQuery: "}]
            content += [{"type": "image"}] if q_image else []
            content += [{"type": "text", "text": _Q + "\nCandidate: "}]
            content += [{"type": "image"}] if c_image else []
            content += [{"type": "text", "text": _C}]
            messages = [
                {"role": "system", "content": self.cfg.system_prompt},
                {"role": "user", "content": content},
            ]
            rendered = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            head, rest = rendered.split(_Q)
            middle, tail = rest.split(_C)
            pieces = [head, middle, tail]
            self._template_cache[key] = pieces
        return pieces

    def __call__(  # type: ignore[override]
        self, pairs: list[tuple[dict[str, Any], dict[str, Any]]], labels: list[Any] | None = None
    ) -> dict[str, Any]:
        """Pairs -> CPU tensors; `labels` (truthy = positive) makes a training batch."""
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        if labels is not None and len(labels) != len(pairs):
            raise ValueError("labels must match pairs one to one")
        images = [side.get("image") for pair in pairs for side in pair]
        present = [i for i, im in enumerate(images) if im is not None]
        grid_of: dict[int, list[int]] = {}
        vision: dict[str, Any] = {}
        if present:
            vision = dict(self.process_images([images[i] for i in present]))
            grid_of = {i: [int(x) for x in vision["image_grid_thw"][k]] for k, i in enumerate(present)}
        q_texts, c_texts = [], []
        for q, c in pairs:
            qt, instr = (
                _clean(q.get("text")),
                _clean(q.get("instruction")) if self.include_instruction else None,
            )
            q_texts.append("\n".join(s for s in (instr, qt) if s) if (instr or qt) else "")
            c_texts.append(_clean(c.get("text")) or "")
        limit = self.cfg.max_text_tokens
        q_ids = [ids[:limit] if limit else ids for ids in self._user_text(q_texts)]
        c_ids = [ids[:limit] if limit else ids for ids in self._user_text(c_texts)]
        rendered = []
        for i in range(len(pairs)):
            qg, cg = grid_of.get(2 * i), grid_of.get(2 * i + 1)
            if not q_ids[i] and qg is None:
                raise ValueError(f"pair {i}: the query has neither text nor image")
            if not c_ids[i] and cg is None:
                raise ValueError(f"pair {i}: the candidate has neither text nor image")
            head, middle, tail = self._template(qg is not None, cg is not None)
            parts = [(self._piece(head), 0), (q_ids[i], 0), (self._piece(middle), 0), (c_ids[i], 0)]
            parts.append((self._piece(tail), 0))
            if labels is not None:
                parts.append(([self.answer_ids[0] if labels[i] else self.answer_ids[1]], 0))
            grids = [g for g in (qg, cg) if g is not None]
            rendered.append(self.assemble(parts, grids, len(q_ids[i]) + len(c_ids[i])))
        batch = pad_rendered(rendered, self.pad_id, self.cfg.padding_side, self.merge_size)
        attn = batch["attention_mask"]
        last = torch.where(attn.bool(), torch.arange(attn.shape[1]).expand_as(attn), -1).max(1).values
        batch["answer_index"] = last - 1 if labels is not None else last
        batch["pool_mask"] = attn.clone()
        if labels is not None:
            lab = torch.full_like(batch["input_ids"], IGNORE_INDEX)
            rows = torch.arange(len(pairs))
            lab[rows, last] = batch["input_ids"][rows, last]
            batch["labels"] = lab
        batch.update(vision)
        return batch


def single_token_id(tokenizer: Any, word: str) -> int:
    """The id of `word` as the assistant's first token; refuse words the vocabulary splits."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer word {word!r} is not a single token in this tokenizer: {ids}")
    return int(ids[0])


def saved_reranker_config(
    model: str | Path, adapter: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> RerankerConfig:
    """The `RerankerConfig` that `Reranker.load(model, adapter, cfg_overrides=overrides)` resolves,
    read without loading weights."""
    return saved_config(RerankerConfig, META_FILE, model, adapter, overrides)


class Reranker(nn.Module):
    """Causal Qwen2-VL judge. `build` for training (fresh LoRA), `load` for inference."""

    def __init__(self, model: Any, processor: Any, cfg: RerankerConfig) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.collator = RerankCollator(
            processor.tokenizer, processor.image_processor, cfg, getattr(processor, "chat_template", None)
        )
        self.one_frame = False  # still images as one frame per patch (`load` sets it; inference only)

    @classmethod
    def build(cls, cfg: RerankerConfig) -> Reranker:
        """Training: base weights frozen, fresh LoRA on every Linear of the language model."""
        from umarvel_ray.model.backbone import load_backbone

        model, processor = load_backbone(
            cfg.model, dtype=cfg.dtype, for_generation=False, attn_implementation=cfg.attn_implementation
        )
        model.requires_grad_(False)
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            model = get_peft_model(
                model,
                PeftLoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=LM_LORA_TARGETS,
                    bias="none",
                ),
            )
        else:
            model.model.language_model.requires_grad_(True)
        rr = cls(model, processor, cfg)
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(rr.base_model, True)
        rr.train()
        return rr

    @classmethod
    def load(
        cls,
        path_or_base: str | Path,
        adapter: str | Path | None = None,
        cfg_overrides: dict[str, Any] | list[str] | None = None,
    ) -> Reranker:
        """Inference: merged dir or base (+ adapter, merged); config from umarvel_reranker.json if any."""
        from umarvel_ray.model.backbone import load_backbone

        cfg = saved_reranker_config(path_or_base, adapter, cfg_overrides)
        model, processor = load_backbone(
            cfg.model, dtype=cfg.dtype, for_generation=False, attn_implementation=cfg.attn_implementation
        )
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.requires_grad_(False)
        rr = cls(model, processor, cfg)
        rr.one_frame = use_frame_patch_embed(model)
        return rr.eval()

    # ------------------------------------------------------------------ persistence
    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def base_model(self) -> Any:
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def _meta(self, model_path: str) -> str:
        from umarvel_ray.config import to_dict

        cfg = to_dict(self.cfg)
        cfg["model"] = model_path
        return json.dumps({"config": cfg, "format_version": 1}, indent=2)

    def save_adapter(self, out_dir: str | Path) -> Path:
        """PEFT adapter + umarvel_reranker.json (for resuming / loading onto the base)."""
        if not self.is_peft:
            raise ValueError("save_adapter needs a LoRA reranker")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        (out / META_FILE).write_text(self._meta(self.cfg.model))
        return out

    def merge_and_save(self, out_dir: str | Path) -> Path:
        """Merge LoRA in place and write a plain HF dir + processor + umarvel_reranker.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            self.model = self.model.merge_and_unload()
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        (out / META_FILE).write_text(self._meta(str(out)))
        return out

    # ------------------------------------------------------------------ compute
    def collate(self, pairs: list[tuple[dict, dict]], labels: list[Any] | None = None) -> dict[str, Any]:
        return self.collator(pairs, labels)

    def answer_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) next-token logits at each item's answer position (causal attention)."""
        device = self.device
        b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        dtype = self.base_model.get_input_embeddings().weight.dtype
        out = self.base_model.model(
            input_ids=b["input_ids"],
            attention_mask=attention_bias(b["attention_mask"], causal=True, dtype=dtype),
            position_ids=b["position_ids"],
            pixel_values=model_pixel_values(
                b, self.collator.pixel_layout, dtype, one_frame=self.one_frame and not self.training
            ),
            image_grid_thw=b.get("image_grid_thw"),
            mm_token_type_ids=b.get("mm_token_type_ids"),
            use_cache=False,
            return_dict=True,
        )
        rows = torch.arange(b["input_ids"].shape[0], device=device)
        hidden = out.last_hidden_state[rows, b["answer_index"]]
        return self.base_model.get_output_embeddings()(hidden).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) float32 logits of [positive word, negative word] (Yes/No or True/False)."""
        pos, neg = self.collator.answer_ids
        return self.answer_logits(batch)[:, [pos, neg]]

    @staticmethod
    def two_word_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (B, 2) [positive word, negative word] logits; `positive` (B,) bool
        says which word is right (class 0 when True, 1 when False). Float32 scalar."""
        target = (~positive.to(torch.bool)).long().to(logits.device)
        return nn.functional.cross_entropy(logits.float(), target)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """SFT loss over the two answer words: cross-entropy of the (B, 2) [pos, neg] logits of
        `forward` against the labelled answer (mean over the batch), i.e. -log P(Yes) for a 'Yes'
        pair and -log P(No) for a 'No' pair with P = softmax over [Yes, No], the same two logits
        `score` reads. A full-vocabulary cross-entropy would spend the gradient on pushing the
        other ~150k words down, which says nothing about Yes versus No."""
        logits = self.answer_logits(batch)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = batch["labels"].to(logits.device)[rows, batch["answer_index"].to(logits.device) + 1]
        pos, neg = self.collator.answer_ids
        return self.two_word_loss(logits[:, [pos, neg]], target == pos)

    def score(self, pairs: list[tuple[dict, dict]], batch_size: int = 16) -> Any:
        """P(positive answer) per pair as float32 numpy, via softmax over the two answer logits."""
        import numpy as np

        if not pairs:
            return np.zeros((0,), dtype=np.float32)
        was_training = self.training
        self.eval()
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(pairs), batch_size):
                    logits = self(self.collate(pairs[i : i + batch_size]))
                    out.append(torch.softmax(logits, dim=-1)[:, 0].cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out).astype(np.float32, copy=False)
