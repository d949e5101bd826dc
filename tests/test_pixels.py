"""Compact pixels: uint8 patches + on-device expansion equal the HF Qwen2-VL processor's pixel_values."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from umarvel_ray.model.embedder import Embedder
from umarvel_ray.model.inputs import Collator
from umarvel_ray.model.pixels import FramePatchEmbed, PatchLayout, model_pixel_values


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def emb(tiny_model_dir) -> Embedder:
    return Embedder.load(tiny_model_dir)


def _collators(emb: Embedder) -> tuple[Collator, Collator]:
    """(compact, HF processor) collators over the same tokenizer and processor."""
    c = emb.collator
    hf_cfg = dataclasses.replace(c.cfg, compact_pixels=False)
    return c, Collator(c.tokenizer, c.image_processor, hf_cfg, chat_template=c.chat_template)


@pytest.mark.parametrize("processor", ["tiny", "qwen2vl_defaults"])
def test_expand_of_patches_equals_the_hf_processor(emb, processor):
    ip = emb.collator.image_processor if processor == "tiny" else Qwen2VLImageProcessorPil()
    layout = PatchLayout.from_processor(ip)
    assert layout is not None and layout.factor == 28
    images = [_image(0, 84, 84), _image(1, 56, 112), _image(2, 364, 504)]
    budget = {"shortest_edge": 4 * 28 * 28, "longest_edge": 300 * 28 * 28}
    want = ip(images=images, return_tensors="pt", input_data_format="channels_last", size=budget)
    pairs = [layout.patchify(im) for im in images]
    patches = torch.from_numpy(np.concatenate([p for p, _ in pairs]))
    assert [g for _, g in pairs] == want["image_grid_thw"].tolist()
    got = layout.expand(patches)
    assert got.shape == want["pixel_values"].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want["pixel_values"], atol=1e-6, rtol=0)
    # on the wire: 1 byte per pixel value and one temporal copy, vs 4 bytes x T=2 copies
    assert patches.dtype == torch.uint8 and patches.numel() * 8 == want["pixel_values"].nbytes


def test_collators_agree_including_resize_and_budget(emb):
    """Unaligned and over-budget images are resized exactly as the processor resizes them."""
    compact, hf = _collators(emb)
    images = [_image(3, 375, 500), _image(4, 90, 61), _image(5, 1000, 700)]
    a, b = compact.process_images(images), hf.process_images(images)
    assert set(a) == {"pixel_patches", "image_grid_thw"} and set(b) == {"pixel_values", "image_grid_thw"}
    assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    assert a["image_grid_thw"].tolist()[0] == [1, 26, 36]  # 375x500 -> 364x504 under 300*28*28
    torch.testing.assert_close(
        compact.pixel_layout.expand(a["pixel_patches"]), b["pixel_values"], atol=1e-6, rtol=0
    )


def test_embeddings_do_not_depend_on_the_pixel_path(emb):
    compact, hf = _collators(emb)
    items = [
        {"text": "a red circle", "image": _image(6, 84, 112)},
        {"text": None, "image": _image(7, 375, 500)},
        {"text": "only text", "image": None},
    ]
    with torch.inference_mode():
        a = emb(compact(items, is_query=False))
        b = emb(hf(items, is_query=False))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused_with_the_reason(emb):
    layout = emb.collator.pixel_layout
    with pytest.raises(ValueError, match="multiples of 28"):
        layout.patchify(_image(0, 85, 84))
    with pytest.raises(ValueError, match="uint8"):
        layout.patchify(_image(0, 84, 84).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        layout.expand(torch.zeros(4, 3, 14, 14))
    with pytest.raises(ValueError, match="no patch layout"):
        model_pixel_values({"pixel_patches": torch.zeros(4, 3, 14, 14, dtype=torch.uint8)}, None)
    assert model_pixel_values({"input_ids": torch.zeros(1, 2)}, layout) is None


def test_processors_without_a_patch_layout_keep_the_processor_path():
    assert PatchLayout.from_processor(SimpleNamespace(patch_size=14)) is None
    assert PatchLayout.from_processor(Qwen2VLImageProcessorPil()).temporal_patch_size == 2


def test_inference_feeds_one_frame_and_keeps_the_weights_layout(emb, tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    pe = emb.base_model.model.visual.patch_embed
    assert emb.one_frame and isinstance(pe, FramePatchEmbed)
    stock = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert set(emb.model.state_dict()) == set(stock.state_dict())  # merge_and_save writes the same keys
    patches = emb.collate([{"text": None, "image": _image(8, 56, 84)}], is_query=False)["pixel_patches"]
    layout = emb.collator.pixel_layout
    with torch.inference_mode():
        one = pe(layout.expand(patches, one_frame=True))
        full = pe(layout.expand(patches))
        ref = stock.model.visual.patch_embed(layout.expand(patches))
    assert one.shape == (patches.shape[0], pe.embed_dim)
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, ref, atol=0, rtol=0)
    # training mode (where ZeRO-3 may partition the weights) feeds full frames through the Conv3d
    batch = emb.collate([{"text": "x", "image": _image(9, 56, 56)}], is_query=False)
    with torch.inference_mode():
        a = emb(batch)
        emb.train()
        try:
            b = emb(batch)
        finally:
            emb.eval()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
