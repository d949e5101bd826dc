"""Reranker: P(Yes) from the two answer logits, answer-only labels, LoRA/merge, padding invariance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from umarvel_ray.model.embedder import LoraConfig
from umarvel_ray.model.inputs import InputConfig
from umarvel_ray.model.pixels import model_pixel_values
from umarvel_ray.model.reranker import IGNORE_INDEX, Reranker, RerankerConfig


def _image(seed: int, h: int = 84, w: int = 84) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _pairs() -> list[tuple[dict, dict]]:
    q_text = {
        "text": "A red circle.",
        "image": None,
        "instruction": "Retrieve an image that matches the caption.",
    }
    q_img = {"text": "Make it blue.", "image": _image(1), "instruction": None}
    return [
        (q_text, {"text": None, "image": _image(2)}),
        (q_img, {"text": "A blue circle at the top left of the picture.", "image": _image(3, 56, 112)}),
        (q_text, {"text": "A green square.", "image": None}),
    ]


def _perturb_lora(rr: Reranker, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rr.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def rr(tiny_model_dir) -> Reranker:
    r = Reranker.build(RerankerConfig(model=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    _perturb_lora(r)
    return r.eval()


def _hf_logits(rr: Reranker, batch: dict) -> torch.Tensor:
    """Reference: the stock HF forward (own causal mask + LM head over every position)."""
    keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    )
    batch = {**batch, "pixel_values": model_pixel_values(batch, rr.collator.pixel_layout)}
    with torch.no_grad():
        return rr.model(**{k: batch[k] for k in keys if batch.get(k) is not None}).logits


def test_prompt_rendering_and_answer_position(rr):
    batch = rr.collate(_pairs())
    tok = rr.processor.tokenizer
    text = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    img = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # noqa: E731
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"Does the candidate meet the query? Answer Yes or No.\nQuery: {img(9)}Make it blue."
        f"\nCandidate: {img(8)}A blue circle at the top left of the picture.<|im_end|>\n<|im_start|>assistant\n"
    )
    first = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "Query: Retrieve an image that matches the caption.\nA red circle.\nCandidate: " in first
    last = batch["attention_mask"].sum(1) - 1  # right padding
    assert torch.equal(batch["answer_index"], last)
    ref, _ = rr.base_model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(ref, batch["position_ids"])  # two images in one sequence


def test_p_yes_is_softmax_of_the_two_answer_logits(rr):
    pairs = _pairs()
    scores = rr.score(pairs, batch_size=2)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert ((scores >= 0) & (scores <= 1)).all()
    batch = rr.collate(pairs)
    logits = _hf_logits(rr, batch)
    tok = rr.processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    for i in range(len(pairs)):
        pos = int(batch["answer_index"][i])
        ly, ln = float(logits[i, pos, yes]), float(logits[i, pos, no])
        by_hand = np.exp(ly) / (np.exp(ly) + np.exp(ln))
        assert abs(scores[i] - by_hand) < 1e-5
    assert np.ptp(scores) > 1e-4  # a perturbed judge does not give every pair the same score


@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_do_not_depend_on_padding_or_batch(rr, side):
    cfg = dataclasses.replace(rr.cfg, inputs=InputConfig(padding_side=side, max_text_tokens=240))
    other = Reranker(rr.model, rr.processor, cfg).eval()
    together = other.score(_pairs(), batch_size=8)
    alone = np.array([other.score([p])[0] for p in _pairs()])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_training_labels_only_on_the_answer_token(rr):
    pairs = _pairs()
    batch = rr.collate(pairs, labels=[1, 0, True])
    tok = rr.processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX
    assert labelled.sum(1).tolist() == [1, 1, 1]
    last = batch["attention_mask"].sum(1) - 1
    for i, target in enumerate([yes, no, yes]):
        assert int(labels[i, last[i]]) == target == int(batch["input_ids"][i, last[i]])
        assert int(batch["answer_index"][i]) == int(last[i]) - 1
    # the prompt part equals the scoring prompt: training and scoring read the same position
    plain = rr.collate(pairs)
    for i in range(3):
        n = int(plain["attention_mask"][i].sum())
        assert torch.equal(batch["input_ids"][i, :n], plain["input_ids"][i, :n])
    # our one-position loss equals the two-word cross-entropy of the stock HF causal LM's logits at
    # the labelled position (the loss is over [Yes, No] only, issue #13; it used to be the full
    # vocabulary's, i.e. HF's own `.loss`)
    keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    )
    batch = {**batch, "pixel_values": model_pixel_values(batch, rr.collator.pixel_layout)}
    with torch.no_grad():
        hf_logits = rr.model(**{k: batch[k] for k in keys}).logits.float()
        ours = rr.loss(batch)
    rows = torch.arange(3)
    two = hf_logits[rows, last - 1][:, [yes, no]]
    hf = torch.nn.functional.cross_entropy(two, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


def test_true_false_judge(rr):
    cfg = dataclasses.replace(rr.cfg, judge="true_false")
    tf = Reranker(rr.model, rr.processor, cfg).eval()
    tok = rr.processor.tokenizer
    assert tf.collator.answer_ids == tuple(tok.convert_tokens_to_ids(["True", "False"]))
    batch = tf.collate(_pairs()[:1])
    assert "Answer True or False." in tok.decode(batch["input_ids"][0])
    s = tf.score(_pairs()[:1])
    logits = _hf_logits(tf, batch)[0, int(batch["answer_index"][0])]
    ref = torch.softmax(logits[list(tf.collator.answer_ids)], -1)[0]
    assert abs(float(s[0]) - float(ref)) < 1e-5


def test_lora_only_on_language_model_and_gradients(tiny_model_dir):
    r = Reranker.build(RerankerConfig(model=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    names = {n for n, p in r.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and ".language_model." in n for n in names)
    assert not any(".lora_" in n for n, _ in r.named_parameters() if ".visual." in n)
    r.train()
    r.loss(r.collate(_pairs(), labels=[1, 0, 0])).backward()
    assert all(p.grad is None for n, p in r.named_parameters() if n not in names)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in r.named_parameters() if "lora_B" in n
    )


def test_merge_equals_base_plus_adapter_and_reload_is_exact(tiny_model_dir, tmp_path):
    r = Reranker.build(
        RerankerConfig(model=str(tiny_model_dir), judge="true_false", lora=LoraConfig(r=4, alpha=8))
    )
    _perturb_lora(r, seed=3)
    r.eval()
    with_adapter = r.score(_pairs())
    r.save_adapter(tmp_path / "adapter")
    r.merge_and_save(tmp_path / "merged")
    merged = r.score(_pairs())
    np.testing.assert_allclose(merged, with_adapter, atol=1e-5)
    loaded = Reranker.load(tmp_path / "merged")
    assert loaded.cfg.judge == "true_false"
    assert loaded.one_frame  # inference feeds still images as one frame per patch ...
    np.testing.assert_allclose(loaded.score(_pairs()), merged, atol=1e-6)
    loaded.one_frame = False  # ... and with the training-side patch path the reload is exact
    np.testing.assert_array_equal(loaded.score(_pairs()), merged)
    from_adapter = Reranker.load(tiny_model_dir, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(from_adapter.score(_pairs()), with_adapter, atol=1e-5)
    base = Reranker.load(tiny_model_dir, cfg_overrides={"judge": "true_false"})
    assert np.abs(base.score(_pairs()) - with_adapter).max() > 1e-4


def test_pairs_without_content_are_refused(rr):
    with pytest.raises(ValueError, match="candidate has neither"):
        rr.collate([({"text": "x"}, {"text": None, "image": None})])
