"""Load a Qwen2-VL-family backbone and its processor from an HF id or a local directory.

One code path serves `Qwen/Qwen2-VL-7B-Instruct` on a GPU cluster and the tiny offline checkpoint in
CI: the model class is picked from the checkpoint's config, and the processor is always one that
has an image processor and a tokenizer (the upstream processor also wants a video processor, which
needs torchvision; we never feed videos, so an image-only subclass is used when that is missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# model_type -> (module, model class, processor class) inside transformers.models
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}
_IMAGE_ONLY_PREFIX = "ImageOnly"
_CLASS_CACHE: dict[str, type] = {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _hub_kwargs(name_or_path: str | Path) -> dict[str, Any]:
    """local_files_only for local dirs and offline mode, so nothing ever tries the network then."""
    return {"local_files_only": _offline() or Path(name_or_path).is_dir()}


def resolve_dtype(dtype: Any) -> Any:
    """Map None/"float32"/"bfloat16"/"float16"/"auto"/torch.dtype to a torch dtype.

    "auto" means bf16 where a CUDA device supports it and fp32 otherwise (CPU bf16 is slow and
    would break the fp32 equality tests), not the checkpoint's dtype.
    """
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table.update({"float16": torch.float16, "fp16": torch.float16})
    if name not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return table[name]


def image_only_processor_class(model_type: str = "qwen2_vl") -> type:
    """The upstream processor class minus its video processor; importable by name for pickling."""
    import importlib

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    module, _, proc_name = SUPPORTED_MODEL_TYPES[model_type]
    name = _IMAGE_ONLY_PREFIX + proc_name
    if name not in _CLASS_CACHE:
        base = getattr(importlib.import_module(f"transformers.models.{module}"), proc_name)

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
            base.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        cls = type(
            name,
            (base,),
            {
                "__init__": __init__,
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{proc_name} without a video processor (images and text only).",
            },
        )
        _CLASS_CACHE[name] = cls
    return _CLASS_CACHE[name]


def __getattr__(name: str) -> type:
    """Lets pickle and `processor_class` lookups find the image-only classes lazily."""
    for model_type, (_, _, proc_name) in SUPPORTED_MODEL_TYPES.items():
        if name == _IMAGE_ONLY_PREFIX + proc_name:
            return image_only_processor_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_json(name_or_path: str | Path, filename: str) -> dict[str, Any]:
    from transformers.utils import cached_file

    path = cached_file(
        str(name_or_path),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **_hub_kwargs(name_or_path),
    )
    return json.loads(Path(path).read_text()) if path else {}


def load_config(name_or_path: str | Path) -> Any:
    """The checkpoint's config, checked to be a supported Qwen-VL family member."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path), **_hub_kwargs(name_or_path))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path}: model_type {config.model_type!r} is not supported "
            f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def load_processor(name_or_path: str | Path) -> Any:
    """Processor with `.tokenizer` and `.image_processor` for any supported checkpoint.

    AutoProcessor returns only the tokenizer for the image-only class, and fails without
    torchvision for upstream checkpoints, so the class is chosen explicitly here.
    """
    import importlib

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    config = load_config(name_or_path)
    kwargs = _hub_kwargs(name_or_path)
    saved = _read_json(name_or_path, "processor_config.json").get("processor_class", "")
    if saved.startswith(_IMAGE_ONLY_PREFIX):
        return image_only_processor_class(config.model_type).from_pretrained(str(name_or_path), **kwargs)
    try:
        processor = AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
    except (ImportError, OSError, ValueError, TypeError):
        pass  # typically: no torchvision for the video processor
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(name_or_path), **kwargs)
    except (ImportError, ValueError):
        module = importlib.import_module(
            f"transformers.models.{SUPPORTED_MODEL_TYPES[config.model_type][0]}.image_processing_pil_"
            f"{SUPPORTED_MODEL_TYPES[config.model_type][0]}"
        )
        image_processor = next(
            getattr(module, n) for n in dir(module) if n.endswith("ImageProcessorPil")
        ).from_pretrained(str(name_or_path), **kwargs)
    cls = image_only_processor_class(config.model_type)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def load_backbone(
    name_or_path: str | Path,
    dtype: Any = None,
    for_generation: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """(model, processor) for a Qwen2-VL / Qwen2.5-VL checkpoint (HF id or local dir).

    Always the `...ForConditionalGeneration` class, so a merged embedder saves as a plain HF
    checkpoint that loads anywhere. `for_generation=False` (embedding, training) disables the KV
    cache; True keeps it and returns the model in eval mode. `attn_implementation` defaults to
    "sdpa", which (like "eager") honours the explicit 4-D masks the embedder passes.
    """
    import importlib

    config = load_config(name_or_path)
    module, model_cls, _ = SUPPORTED_MODEL_TYPES[config.model_type]
    cls = getattr(importlib.import_module(f"transformers.models.{module}"), model_cls)
    torch_dtype = resolve_dtype(dtype)
    model = cls.from_pretrained(
        str(name_or_path),
        dtype=torch_dtype,
        attn_implementation=attn_implementation or "sdpa",
        **_hub_kwargs(name_or_path),
    )
    text_config = model.config.get_text_config()
    text_config.use_cache = bool(for_generation)
    if for_generation:
        model.eval()
    return model, load_processor(name_or_path)


def count_parameters(model: Any) -> int:
    """Total parameter count (used by the tiny factory and the benchmark's FLOP estimate)."""
    return sum(p.numel() for p in model.parameters())
