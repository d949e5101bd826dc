"""The tiny offline Qwen2-VL: a real checkpoint that loads through the same code as Qwen/Qwen2-VL-*."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from umarvel_ray.model.backbone import load_backbone, load_processor
from umarvel_ray.model.tiny import ANSWER_WORDS, QWEN2VL_SPECIAL_TOKENS, make_tiny_qwen2vl


def _image(seed: int = 0, h: int = 84, w: int = 84) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _prompt(processor, with_image: bool, text: str | None) -> str:
    content = ([{"type": "image"}] if with_image else []) + ([{"type": "text", "text": text}] if text else [])
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def test_loads_via_auto_classes_and_runs_text_image_and_image_text(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

    assert AutoConfig.from_pretrained(tiny_model_dir).model_type == "qwen2_vl"
    auto_model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model, processor = load_backbone(tiny_model_dir)
    assert isinstance(model, Qwen2VLForConditionalGeneration) and isinstance(auto_model, type(model))
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 5_000_000
    for with_image, text in [(False, "A red circle."), (True, None), (True, "Make it blue.")]:
        inputs = processor(
            text=[_prompt(processor, with_image, text)],
            images=[_image()] if with_image else None,
            return_tensors="pt",
        )
        n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        # 84x84 image, patch 14, merge 2 => 3x3 = 9 tokens (the contract)
        assert n_image_tokens == (9 if with_image else 0)
        assert "mm_token_type_ids" in inputs
        with torch.no_grad():
            out = model(**inputs)
            auto_out = auto_model(**inputs)
        assert out.logits.shape == (
            1,
            inputs["input_ids"].shape[1],
            model.config.get_text_config().vocab_size,
        )
        assert torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.logits, auto_out.logits)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_model_dir):
    a = make_tiny_qwen2vl(tmp_path / "a", seed=0)
    b = make_tiny_qwen2vl(tmp_path / "b", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_tokenizer_special_tokens_answer_words_and_chat_template(tiny_model_dir):
    tok = load_processor(tiny_model_dir).tokenizer
    vocab = tok.get_vocab()
    for special in QWEN2VL_SPECIAL_TOKENS:
        assert special in vocab, special
        assert tok(special, add_special_tokens=False)["input_ids"] == [vocab[special]]
    for word in ANSWER_WORDS:
        for variant in (word, " " + word):
            assert len(tok(variant, add_special_tokens=False)["input_ids"]) == 1, variant
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in rendered
    assert (
        tok.decode(tok("a small red circle", add_special_tokens=False)["input_ids"]) == "a small red circle"
    )


def test_processor_class_round_trips_and_pickles(tiny_model_dir, tmp_path):
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = load_processor(tiny_model_dir)
    assert type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    # AutoProcessor on this dir degrades to the tokenizer only: why load_processor exists
    assert not hasattr(AutoProcessor.from_pretrained(tiny_model_dir), "image_processor")
    processor.save_pretrained(tmp_path / "p")
    again = load_processor_from_saved(tiny_model_dir, tmp_path / "p")
    assert type(again) is type(processor)
    clone = pickle.loads(pickle.dumps(processor))
    text = _prompt(processor, True, "x")
    a = processor(text=[text], images=[_image()], return_tensors="pt")
    b = clone(text=[text], images=[_image()], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def load_processor_from_saved(model_dir, processor_dir):
    """A processor-only dir has no config.json; copy it in so load_processor can check the family."""
    import shutil

    shutil.copy(model_dir / "config.json", processor_dir / "config.json")
    return load_processor(processor_dir)


def test_unsupported_model_type_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        load_backbone(tmp_path)


def test_qwen2_5_vl_family_through_the_same_code(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from umarvel_ray.model.embedder import Embedder

    path = make_tiny_qwen2vl(tmp_path / "q25", seed=0, family="qwen2_5_vl")
    model, processor = load_backbone(path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    emb = Embedder.load(path)
    items = [
        {"text": "A red circle.", "image": None, "instruction": "Find it."},
        {"text": "Make it blue.", "image": _image(1, 56, 112), "instruction": None},
    ]
    batch = emb.collate(items, is_query=True)
    ref, _ = emb.base_model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(ref, batch["position_ids"])
    together = emb.encode_queries(items)
    alone = np.concatenate([emb.encode_queries([it]) for it in items])
    np.testing.assert_allclose(together, alone, atol=1e-4)
