"""A real, toy-sized Qwen2-VL checkpoint built offline (random weights, locally trained tokenizer).

No Qwen weights or vocabulary can be downloaded on the project machine, yet the loading, input
rendering, LoRA and merge code must run against the *real* transformers classes. This module writes
a directory that `load_backbone` (and the HF Auto classes) load exactly like `Qwen/Qwen2-VL-2B-Instruct`:
config + safetensors, a byte-level BPE tokenizer carrying Qwen2-VL's special tokens and chat
template, the PIL image processor (torchvision is unavailable) and a processor config.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Qwen2-VL's added tokens, in the upstream order (ids are local to the tiny vocabulary).
QWEN2VL_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (images become <|vision_start|><|image_pad|><|vision_end|>).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the reranker and embedder prompts rely on being single tokens (with and without a space).
ANSWER_WORDS = ("Yes", "No", "True", "False")

TINY_BPE_VOCAB = 1200
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH = 2

_COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "black",
    "white",
    "gray",
    "pink",
    "brown",
    "cyan",
]
_SHAPES = [
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "rectangle",
    "diamond",
    "cross",
    "ellipse",
    "heart",
]
_POSITIONS = [
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "top left",
    "bottom right",
    "above",
    "below",
    "next to",
    "in the corner",
]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_SIZES = ["small", "large", "big", "tiny", "medium"]
_INSTRUCTIONS = [
    "Retrieve an image that matches the given caption.",
    "Find a caption for the image.",
    "Identify the news photo that corresponds to the headline.",
    "Retrieve a Wikipedia paragraph that answers this question.",
    "Find an image of the same product with the change described.",
    "I want to find a fashion image that matches the description.",
    "Obtain a similar everyday image.",
    "Given a question, retrieve an image and text that answer it.",
    "Retrieve a passage that describes the image.",
    "Find a news caption that describes this photo.",
    "Provide a description for the scene in the picture.",
    "Match the sentence with a relevant image.",
]
_FIXED = [
    "You are a helpful assistant.",
    "Summarize above image and sentence in one word:",
    "Summarize above sentence in one word:",
    "Summarize above image in one word:",
    "Does the candidate meet the query? Answer Yes or No.",
    "Does the candidate match the query? Answer True or False.",
    "Instruct: Query: Candidate: Answer:",
    "The answer is Yes. The answer is No. It is True. It is False.",
    "Yes No True False yes no true false",
    "system user assistant system user assistant",
    "user: a question. assistant: an answer. system: a rule.",
    "a picture of a scene with shapes on a plain background",
    "There is a photo of the object in the image.",
]


def _corpus(seed: int, n_sentences: int = 1500) -> list[str]:
    """Deterministic toy English: scene captions, M-BEIR-like instructions and judge prompts."""
    rng = random.Random(seed)
    lines = list(_FIXED) + list(_INSTRUCTIONS)
    for _ in range(n_sentences):
        c, s, p = rng.choice(_COLOURS), rng.choice(_SHAPES), rng.choice(_POSITIONS)
        n, z = rng.choice(_NUMBERS), rng.choice(_SIZES)
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(f"A {z} {c} {s} at the {p}.")
        elif kind == 1:
            lines.append(f"{n.capitalize()} {c} {s}s {p} a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}.")
        elif kind == 2:
            lines.append(f"{rng.choice(_INSTRUCTIONS)} {c} {s} {rng.randrange(100)}")
        elif kind == 3:
            ans = rng.choice(ANSWER_WORDS)
            lines.append(f"Query: a {c} {s}. Candidate: a {z} {s}. Answer: {ans}")
        elif kind == 4:
            lines.append(f"Is the {s} {c}? {rng.choice(ANSWER_WORDS)}, it is {z}.")
        else:
            lines.append(f"The {c} {s} is {p} of the {rng.choice(_SHAPES)}, {rng.randrange(1000)} px.")
    return lines


def _train_tokenizer(seed: int) -> Any:
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped in transformers' Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    raw = Tokenizer(BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN2VL_SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    for word in ANSWER_WORDS:
        for variant in (word, " " + word):
            ids = tok.encode(variant, add_special_tokens=False)
            if len(ids) != 1:
                raise RuntimeError(f"tiny tokenizer: {variant!r} is not a single token ({ids})")
    return tok


def tiny_config(vocab_size: int, tokenizer: Any, family: str = "qwen2_vl") -> Any:
    """The toy config: text 128 x 2 layers (head_dim 32), vision 64 x 2, 28 px per token."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "use_cache": True,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH,
    }
    if family == "qwen2_vl":
        vision.update(embed_dim=64, hidden_size=128, mlp_ratio=2)
        config_cls = Qwen2VLConfig
    elif family == "qwen2_5_vl":
        vision.update(
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=128,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        config_cls = Qwen2_5_VLConfig
    else:
        raise ValueError(f"family must be qwen2_vl or qwen2_5_vl, got {family!r}")
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def make_tiny_qwen2vl(out_dir: str | Path, seed: int = 0, family: str = "qwen2_vl") -> Path:
    """Write a toy Qwen2-VL (or, with family="qwen2_5_vl", Qwen2.5-VL) checkpoint of ~0.7M params
    to `out_dir`; the same seed gives the same bytes."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from umarvel_ray.model.backbone import image_only_processor_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(seed)
    vocab_size = len(tok)  # no spare rows: adding <emb> & co. must exercise the resize path
    config = tiny_config(vocab_size, tok, family)
    model_cls = (
        Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=4 * 28 * 28,
        max_pixels=300 * 28 * 28,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH,
    )
    processor = image_only_processor_class(family)(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN2VL_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    return out
