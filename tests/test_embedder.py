"""Embedder: input rendering, bidirectional mask, pooling, batch invariance, LoRA, save/load/merge."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from umarvel_ray.model.embedder import Embedder, EmbedderConfig, LoraConfig
from umarvel_ray.model.inputs import (
    COMPRESSION_SUFFIX,
    INSTRUCTION_END,
    INSTRUCTION_START,
    InputConfig,
)

INSTR = "Retrieve an image that matches the given caption."


def _image(seed: int, h: int = 84, w: int = 84) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _items() -> list[dict]:
    """A mixed batch: text, image, image+text (different image sizes), with and without instruction."""
    return [
        {"text": "A small red circle at the top left.", "image": None, "instruction": INSTR},
        {"text": None, "image": _image(1), "instruction": "Find a caption for the image."},
        {"text": "Make the square blue.", "image": _image(2, 56, 112), "instruction": None},
        {
            "text": "Two green stars next to a yellow hexagon and a big triangle.",
            "image": None,
            "instruction": None,
        },
    ]


def _cfg(model_dir, **kw) -> EmbedderConfig:
    inputs = kw.pop("inputs", InputConfig())
    return EmbedderConfig(model=str(model_dir), inputs=inputs, lora=LoraConfig(r=4, alpha=8), **kw)


def _perturb_lora(emb: Embedder, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); make it non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in emb.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def emb(tiny_model_dir) -> Embedder:
    e = Embedder.build(_cfg(tiny_model_dir))
    _perturb_lora(e)
    return e.eval()


def _with(emb: Embedder, **changes) -> Embedder:
    """Same weights, another config (e.g. causal attention, other padding side)."""
    inputs = changes.pop("inputs", emb.cfg.inputs)
    cfg = dataclasses.replace(emb.cfg, inputs=inputs, **changes)
    return Embedder(emb.model, emb.processor, cfg).eval()


# ---------------------------------------------------------------------------- rendering / collate
def test_collate_renders_the_umarvel_chat_and_masks(emb):
    batch = emb.collate(_items(), is_query=True)
    tok = emb.processor.tokenizer
    assert set(batch) >= {
        "input_ids",
        "attention_mask",
        "pool_mask",
        "pixel_patches",
        "image_grid_thw",
        "mm_token_type_ids",
        "position_ids",
    }
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    texts = [
        tok.decode(row[m.bool()]) for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n"
    assert texts[0] == (
        f"{head}{INSTRUCTION_START}{INSTR}{INSTRUCTION_END}A small red circle at the top left."
        f"{COMPRESSION_SUFFIX['text']}{tail}"
    )
    assert texts[1].startswith(head + "<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>")
    assert texts[1].endswith(f"<instruction_end>{COMPRESSION_SUFFIX['image']}{tail}")
    # 56x112 image -> grid 4x8 patches -> 2x4 = 8 merged tokens
    assert texts[2] == (
        f"{head}<|vision_start|>{'<|image_pad|>' * 8}<|vision_end|>Make the square blue."
        f"{COMPRESSION_SUFFIX['image_text']}{tail}"
    )
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 4, 8]]
    assert int(batch["mm_token_type_ids"].sum()) == 9 + 8
    # candidates never carry the instruction
    cand = emb.collate(_items(), is_query=False)
    assert int(cand["instruction_mask"].sum()) == 0
    assert torch.equal(cand["pool_mask"], cand["attention_mask"])


def test_compression_suffix_can_be_switched_off(emb):
    off = _with(emb, inputs=InputConfig(compression_suffix=False))
    batch = off.collate(_items()[:1], is_query=False)
    text = off.processor.tokenizer.decode(batch["input_ids"][0])
    assert "Summarize" not in text and text.endswith(
        "left.<|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n"
    )


def test_instruction_tokens_attend_but_are_not_pooled(emb):
    batch = emb.collate(_items()[:2], is_query=True)
    tok = emb.processor.tokenizer
    start, end = tok.convert_tokens_to_ids([INSTRUCTION_START, INSTRUCTION_END])
    for row in range(2):
        ids = batch["input_ids"][row].tolist()
        s, e = ids.index(start), ids.index(end)
        span = torch.zeros(len(ids), dtype=torch.bool)
        span[s : e + 1] = True
        assert e - s > 3
        assert batch["attention_mask"][row][span].all()
        assert not batch["pool_mask"][row][span].any()
        outside = batch["attention_mask"][row].bool() & ~span
        assert torch.equal(batch["pool_mask"][row].bool(), outside)
    # the instruction is attended: changing it changes the embedding
    other = [dict(it, instruction="Find a news caption that describes this photo.") for it in _items()[:2]]
    with torch.no_grad():
        a, b = emb(batch), emb(emb.collate(other, is_query=True))
    assert (a - b).abs().max() > 1e-3
    # pool_instruction=True pools over every real token
    pooled_all = _with(emb, pool_instruction=True).collate(_items()[:2], is_query=True)
    assert torch.equal(pooled_all["pool_mask"], pooled_all["attention_mask"])


def test_mmembed_format(emb):
    mm = _with(emb, inputs=InputConfig(format="mmembed"))
    tok = mm.processor.tokenizer
    q = mm.collate([{"text": "a red star", "image": _image(3), "instruction": "Find it."}], is_query=True)
    c = mm.collate([{"text": "a red star", "image": _image(3), "instruction": "Find it."}], is_query=False)
    q_text, c_text = tok.decode(q["input_ids"][0]), tok.decode(c["input_ids"][0])
    img = "<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>"
    assert q_text == f"Instruct: Find it.\nQuery: {img}\na red star"
    assert c_text == f"{img}\na red star"
    instr = tok.decode(q["input_ids"][0][q["instruction_mask"][0].bool()])
    assert instr == "Instruct: Find it.\nQuery: "
    with torch.no_grad():
        assert mm(q).shape == (1, mm.dim)


def test_truncation_cuts_text_only_and_keeps_template_suffix(emb):
    long_text = " ".join(["red circle blue square"] * 40)
    short = _with(emb, inputs=InputConfig(max_text_tokens=5))
    tok = emb.processor.tokenizer
    item = {"text": long_text, "image": _image(4), "instruction": INSTR}
    full = emb.collate([item], is_query=True)
    cut = short.collate([item], is_query=True)
    text_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > 5
    n_full, n_cut = full["input_ids"].shape[1], cut["input_ids"].shape[1]
    assert n_full - n_cut == len(text_ids) - 5
    decoded = tok.decode(cut["input_ids"][0])
    assert tok.decode(text_ids[:5]) + COMPRESSION_SUFFIX["image_text"] in decoded
    assert decoded.endswith("<|im_start|>assistant\n<emb>.<|im_end|>\n")
    assert int(cut["mm_token_type_ids"].sum()) == 9 and INSTR in decoded


def test_pixel_budget_and_array_or_pil_images(emb):
    from PIL import Image

    img = _image(5, 280, 280)
    small = _with(emb, inputs=InputConfig(max_pixels=4 * 28 * 28, min_pixels=4 * 28 * 28))
    b_small = small.collate([{"text": None, "image": img}], is_query=False)
    b_pil = emb.collate([{"text": None, "image": Image.fromarray(img)}], is_query=False)
    b_arr = emb.collate([{"text": None, "image": img}], is_query=False)
    assert int(b_small["mm_token_type_ids"].sum()) == 4  # 56x56 -> 2x2 merged tokens
    assert int(b_arr["mm_token_type_ids"].sum()) == 100  # 280x280 -> 10x10
    assert torch.equal(b_pil["pixel_patches"], b_arr["pixel_patches"])


def test_item_text_cannot_forge_special_tokens(emb):
    batch = emb.collate([{"text": "a <|image_pad|> and <emb> here", "image": None}], is_query=False)
    tok = emb.processor.tokenizer
    image_pad, emb_id = tok.convert_tokens_to_ids(["<|image_pad|>", "<emb>"])
    assert int((batch["input_ids"] == image_pad).sum()) == 0
    assert int((batch["input_ids"] == emb_id).sum()) == 1  # only the assistant's <emb>
    with torch.no_grad():
        assert torch.isfinite(emb(batch)).all()


def test_empty_items_are_refused(emb):
    with pytest.raises(ValueError, match="neither text nor image"):
        emb.collate([{"text": "  ", "image": None}], is_query=False)


def test_position_ids_match_the_models_rope_helper(emb):
    for side in ("left", "right"):
        e = _with(emb, inputs=InputConfig(padding_side=side))
        batch = e.collate(_items(), is_query=True)
        ref, _ = e.base_model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        assert torch.equal(batch["position_ids"], ref)
        text_only = e.collate([_items()[0], _items()[3]], is_query=True)
        m = text_only["attention_mask"]
        cumsum = (m.cumsum(-1) - 1).clamp(min=0)
        for row in range(3):
            assert torch.equal(text_only["position_ids"][row][m.bool()], cumsum[m.bool()])


def test_collator_pickles(emb):
    clone = pickle.loads(pickle.dumps(emb.collator))
    a, b = emb.collator(_items(), is_query=True), clone(_items(), is_query=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- attention / pooling
def _no_pad_batch(emb: Embedder) -> dict:
    items = [
        {"text": "A red circle at the top left of a blue square.", "image": _image(6), "instruction": INSTR}
    ] * 2
    batch = emb.collate(items, is_query=True)
    assert bool(batch["attention_mask"].all())  # NO padding anywhere
    return batch


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_later_token_changes_earlier_state_only_when_bidirectional(emb, attention):
    e = _with(emb, attention=attention)
    batch = _no_pad_batch(e)
    edited = {k: v.clone() for k, v in batch.items()}
    length = batch["input_ids"].shape[1]
    j = length - 3  # a token in the assistant turn
    edited["input_ids"][1, j] = e.processor.tokenizer.convert_tokens_to_ids("Ġred")
    with torch.no_grad():
        h0, h1 = e.hidden_states(batch), e.hidden_states(edited)
    assert torch.equal(h0[0], h1[0])  # untouched row
    first_text = 20  # inside the system prompt / image block, well before j
    diff = (h0[1, :j] - h1[1, :j]).abs().amax(-1)
    if attention == "bidirectional":
        assert diff[first_text] > 1e-4 and bool((diff > 1e-6).all())
    else:
        assert float(diff.max()) < 1e-6


def test_mean_pool_equals_hand_computed_mean(emb):
    batch = emb.collate(_items(), is_query=True)
    tok = emb.processor.tokenizer
    start, end = tok.convert_tokens_to_ids([INSTRUCTION_START, INSTRUCTION_END])
    with torch.no_grad():
        hidden = emb.hidden_states(batch)
        out = emb(batch)
    for row in range(len(_items())):
        ids = batch["input_ids"][row].tolist()
        keep = [bool(m) for m in batch["attention_mask"][row].tolist()]
        if start in ids:
            for k in range(ids.index(start), ids.index(end) + 1):
                keep[k] = False
        vec = hidden[row][torch.tensor(keep)].float().mean(0)
        torch.testing.assert_close(out[row], vec / vec.norm(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(_items())))


def test_last_pooling_reads_the_emb_token(emb):
    last = _with(emb, pooling="last")
    batch = last.collate(_items(), is_query=True)
    emb_id = last.processor.tokenizer.convert_tokens_to_ids("<emb>")
    with torch.no_grad():
        hidden = last.hidden_states(batch)
        out = last(batch)
    for row in range(len(_items())):
        pos = (batch["input_ids"][row] == emb_id).nonzero()[-1, 0]
        vec = hidden[row, pos].float()
        torch.testing.assert_close(out[row], vec / vec.norm(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_item_alone_equals_item_in_padded_mixed_batch(emb, side):
    e = _with(emb, inputs=InputConfig(padding_side=side))
    items = _items()
    batch = e.collate(items, is_query=True)
    assert not bool(batch["attention_mask"].all())  # really padded
    with torch.no_grad():
        together = e(batch)
        alone = torch.cat([e(e.collate([it], is_query=True)) for it in items])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_encode_queries_and_candidates(emb):
    q = emb.encode_queries(_items(), batch_size=3)
    c = emb.encode_candidates(_items(), batch_size=2)
    assert q.dtype == np.float32 and q.shape == (4, emb.dim) == c.shape
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = emb(emb.collate(_items(), is_query=True)).numpy()
    np.testing.assert_allclose(q, ref, atol=1e-4)
    assert not np.allclose(q[0], c[0], atol=1e-4)  # the instruction matters
    assert emb.encode_queries([]).shape == (0, emb.dim)


# ---------------------------------------------------------------------------- LoRA / tau / persistence
def test_lora_only_on_language_model_linears(emb):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in emb.named_parameters() if ".lora_" in n}
    n_layers = emb.base_model.config.get_text_config().num_hidden_layers
    assert len(lora_modules) == n_layers * len(targets)
    assert all("language_model.layers." in n and n.endswith(targets) for n in lora_modules)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # log_tau frozen: learn_tau=False
    visual = [p for n, p in emb.named_parameters() if ".visual." in n]
    assert visual and not any(p.requires_grad for p in visual)
    assert not any(".lora_" in n for n, _ in emb.named_parameters() if ".visual." in n)


def test_tau_and_gradients_flow_to_lora_only(tiny_model_dir):
    e = Embedder.build(_cfg(tiny_model_dir, learn_tau=True, gradient_checkpointing=True))
    assert e.log_tau.requires_grad and abs(e.tau.item() - 0.05) < 1e-7
    base = e.base_model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    e.train()
    out = e(e.collate(_items(), is_query=True))
    (out @ out.T / e.tau).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in e.named_parameters() if p.grad is not None}
    assert "log_tau" in grads
    # lora_B starts at zero, so only B (and tau) get gradients on the first step
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert all(n == "log_tau" or ".lora_" in n for n in grads)


def test_full_llm_finetune_when_lora_disabled(tiny_model_dir):
    cfg = dataclasses.replace(_cfg(tiny_model_dir), lora=LoraConfig(enabled=False))
    e = Embedder.build(cfg)
    names = [n for n, p in e.named_parameters() if p.requires_grad]
    assert names and all(".language_model." in n for n in names)
    assert not e.is_peft


def test_merge_equals_base_plus_adapter_and_save_load_is_exact(tiny_model_dir, tmp_path):
    e = Embedder.build(_cfg(tiny_model_dir))
    _perturb_lora(e, seed=1)
    with torch.no_grad():
        e.log_tau.fill_(float(np.log(0.02)))
    e.eval()
    items = _items()
    with_adapter = e.encode_queries(items)
    e.save_adapter(tmp_path / "adapter")
    merged_dir = e.merge_and_save(tmp_path / "merged")
    assert not e.is_peft
    in_memory_merged = e.encode_queries(items)
    np.testing.assert_allclose(in_memory_merged, with_adapter, atol=1e-5)
    # a plain HF dir: the Auto classes load it, the tokenizer has the 3 added tokens
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(merged_dir).model_type == "qwen2_vl"
    loaded = Embedder.load(merged_dir)
    assert "<emb>" in loaded.processor.tokenizer.get_vocab()
    assert abs(float(loaded.tau) - 0.02) < 1e-6 and loaded.cfg.lora.r == 4
    loaded.one_frame = False  # the training-side (Conv3d over both frames) patch path, as `e` uses
    np.testing.assert_array_equal(loaded.encode_queries(items), in_memory_merged)  # exact
    base_plus_adapter = Embedder.load(tiny_model_dir, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(base_plus_adapter.encode_queries(items), with_adapter, atol=1e-5)
    # and the adapter is not a no-op
    plain = Embedder.load(tiny_model_dir, cfg_overrides=["lora.r=4"])
    assert np.abs(plain.encode_queries(items) - with_adapter).max() > 1e-3


def test_build_is_deterministic_including_new_token_rows(tiny_model_dir):
    a = Embedder.build(_cfg(tiny_model_dir))
    b = Embedder.build(_cfg(tiny_model_dir))
    wa, wb = a.base_model.get_input_embeddings().weight, b.base_model.get_input_embeddings().weight
    assert torch.equal(wa, wb)
    n_old = len(a.processor.tokenizer) - 3
    assert not torch.equal(wa[n_old], wa[n_old + 1])  # the three new rows differ


def test_load_overrides_and_copies_share_nothing(emb, tmp_path):
    merged = copy.deepcopy(emb)
    merged.merge_and_save(tmp_path / "m")
    loaded = Embedder.load(
        tmp_path / "m", cfg_overrides={"attention": "causal", "inputs": {"max_text_tokens": 7}}
    )
    assert loaded.cfg.attention == "causal" and loaded.cfg.inputs.max_text_tokens == 7
    assert loaded.cfg.model == str(tmp_path / "m")
    assert emb.is_peft  # the fixture was not merged by the copy's merge


def _bf16_agrees_with_fp32(model_dir, device: str) -> None:
    e32 = Embedder.load(model_dir)
    e16 = Embedder.load(model_dir, cfg_overrides={"dtype": "bfloat16"}).to(device)
    assert e16.dtype == torch.bfloat16 and e16.device.type == device
    a, b = e32.encode_queries(_items()), e16.encode_queries(_items())
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert (a * b).sum(1).min() > 0.98  # same direction up to bf16 rounding


def test_bf16_forward_runs_and_agrees_with_fp32_on_cpu(tiny_model_dir):
    _bf16_agrees_with_fp32(tiny_model_dir, "cpu")


@pytest.mark.gpu
def test_bf16_forward_on_cuda(tiny_model_dir):
    _bf16_agrees_with_fp32(tiny_model_dir, "cuda")
