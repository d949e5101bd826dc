"""Embedder throughput (items/s) for text, image and image+text inputs, and model FLOPs utilisation.

    python jobs/bench_model.py --quick                        # tiny model, CPU, < 1 min on 2 cores
    python jobs/bench_model.py --model runs/toy/stage4/model  # any saved embedder / HF id
    python jobs/bench_model.py --size 2b --dtype bfloat16 --device cuda   # random-weight Qwen2-VL-2B

MFU = achieved model FLOP/s over the machine's matmul peak, both measured in this run. Model FLOPs
per batch are counted from the real (non-pad) tokens: 2 x (language-model Linear params) x tokens
plus 4 x hidden x len^2 per layer for attention, and the same for the vision tower over image
patches (embedding lookups are free; the LM head is never run by the embedder). The peak is the
best of a few large square `torch.matmul`s in the same dtype on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODALITIES = ("text", "image", "image+text")

QWEN2VL_2B_TEXT = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
QWEN2VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


@dataclass
class Row:
    modality: str
    batch: int
    tokens: float  # mean real tokens per item
    collate_ms: float
    forward_ms: float
    items_per_s: float
    tflops: float
    mfu: float


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="saved embedder dir or HF id (default: tiny model)")
    p.add_argument(
        "--size", choices=["tiny", "2b"], default="tiny", help="random-weight model when no --model"
    )
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument(
        "--image-size", type=int, default=0, help="square image side in px (default 84 tiny, 448 2b)"
    )
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per cell")
    p.add_argument("--quick", action="store_true", help="short timings (CI smoke run, < 1 min on 2 cores)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", default="", help="also write the rows and the best MFU to this JSON file")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: Any, quick: bool) -> float:
    """Best FLOP/s of large square matmuls (the denominator of MFU)."""
    import torch

    n = (8192 if not quick else 4096) if device.startswith("cuda") else (1024 if quick else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    reps = 3 if quick else 10
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        (a @ b).sum()
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _linear_params(module: Any) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _conv_params(module: Any) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Conv3d))


def batch_flops(embedder: Any, batch: dict[str, Any]) -> float:
    """Forward FLOPs of one collated batch (useful work: real tokens/patches only)."""
    base = embedder.base_model
    text_cfg = base.config.get_text_config()
    vis_cfg = base.config.vision_config
    lm = base.model.language_model
    lengths = batch["attention_mask"].sum(1).double()
    flops = 2.0 * _linear_params(lm) * float(lengths.sum())
    flops += 4.0 * text_cfg.hidden_size * text_cfg.num_hidden_layers * float((lengths**2).sum())
    if "image_grid_thw" in batch:
        patches = batch["image_grid_thw"].prod(-1).double()
        visual = base.model.visual
        flops += 2.0 * (_linear_params(visual) + _conv_params(visual)) * float(patches.sum())
        width = getattr(vis_cfg, "embed_dim", None) or vis_cfg.hidden_size  # Qwen2-VL / Qwen2.5-VL
        flops += 4.0 * width * vis_cfg.depth * float((patches**2).sum())
    return flops


def _items(modality: str, n: int, side: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.RandomState(0)
    words = [
        "small",
        "red",
        "circle",
        "left",
        "of",
        "a",
        "large",
        "blue",
        "square",
        "above",
        "two",
        "green",
        "stars",
        "near",
        "the",
        "top",
        "corner",
    ]
    out = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(24)).capitalize() + "."
        image = rng.randint(0, 256, (side, side, 3), dtype=np.uint8)
        out.append(
            {
                "text": None if modality == "image" else text,
                "image": None if modality == "text" else image,
                "instruction": "Retrieve an image that matches the given caption.",
            }
        )
    return out


def build_2b(device: str, dtype: Any, workdir: Path) -> Any:
    """Random-weight Qwen2-VL-2B-sized embedder (tiny tokenizer/processor; no download, no disk)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from umarvel_ray.model.backbone import load_processor
    from umarvel_ray.model.embedder import Embedder, EmbedderConfig, LoraConfig
    from umarvel_ray.model.inputs import ensure_added_tokens
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    tiny = make_tiny_qwen2vl(workdir / "tiny", seed=0)
    processor = load_processor(tiny)
    ids = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(QWEN2VL_2B_TEXT, pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
        vision_config=QWEN2VL_2B_VISION,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    ensure_added_tokens(processor.tokenizer, model)  # 2B vocab has spare rows: no resize
    model.requires_grad_(False)
    cfg = EmbedderConfig(model="random:qwen2-vl-2b", lora=LoraConfig(enabled=False), dtype=str(dtype)[6:])
    return Embedder(model, processor, cfg).eval()


def load_embedder(args: argparse.Namespace, workdir: Path) -> Any:
    import torch

    from umarvel_ray.model.backbone import resolve_dtype
    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    dtype = resolve_dtype(args.dtype)
    if args.model is None and args.size == "2b":
        return build_2b(args.device, dtype, workdir)
    path = args.model or str(make_tiny_qwen2vl(workdir / "tiny", seed=0))
    emb = Embedder.load(path, cfg_overrides={"dtype": str(dtype).replace("torch.", "")})
    return emb.to(torch.device(args.device)).eval()


def bench_cell(emb: Any, modality: str, batch_size: int, side: int, seconds: float, device: str) -> Row:
    import torch

    items = _items(modality, batch_size, side)
    t = time.perf_counter()
    batch = emb.collate(items, is_query=True)
    collate_ms = (time.perf_counter() - t) * 1e3
    batch = {k: v.to(device) for k, v in batch.items()}
    flops = batch_flops(emb, batch)
    with torch.inference_mode():
        emb(batch)  # warm-up (kernels, allocator)
        _sync(device)
        n, start = 0, time.perf_counter()
        while True:
            emb(batch)
            n += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and n >= 2:
                break
    per_batch = elapsed / n
    return Row(
        modality=modality,
        batch=batch_size,
        tokens=float(batch["attention_mask"].sum()) / batch_size,
        collate_ms=collate_ms,
        forward_ms=per_batch * 1e3,
        items_per_s=batch_size / per_batch,
        tflops=flops / per_batch / 1e12,
        mfu=0.0,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    seconds = 0.25 if args.quick else args.seconds
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    side = args.image_size or (448 if args.size == "2b" and args.model is None else 84)
    with tempfile.TemporaryDirectory(prefix="umarvel_bench_") as tmp:
        emb = load_embedder(args, Path(tmp))
        params = sum(p.numel() for p in emb.parameters())
        peak = matmul_peak(args.device, emb.dtype, args.quick)
        name = args.model or ("random Qwen2-VL-2B" if args.size == "2b" else "tiny Qwen2-VL")
        print(
            f"model: {name} | params {params / 1e6:.2f}M | dim {emb.dim} | {args.device} {emb.dtype} | "
            f"threads {torch.get_num_threads()} | image {side}x{side} | attention {emb.cfg.attention}"
        )
        rows = []
        for modality in MODALITIES:
            for bs in sizes:
                row = bench_cell(emb, modality, bs, side, seconds, args.device)
                row.mfu = row.tflops * 1e12 / peak
                rows.append(row)
    header = f"{'modality':<11} {'batch':>5} {'tok/item':>8} {'collate ms':>10} {'fwd ms':>9} {'items/s':>9} "
    header += f"{'TFLOP/s':>8} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.modality:<11} {r.batch:>5} {r.tokens:>8.1f} {r.collate_ms:>10.1f} {r.forward_ms:>9.2f} "
            f"{r.items_per_s:>9.1f} {r.tflops:>8.4f} {r.mfu:>6.2%}"
        )
    best = max(rows, key=lambda r: r.mfu)
    print(
        f"MFU: best {best.mfu:.2%} ({best.modality}, batch {best.batch}); "
        f"matmul peak {peak / 1e12:.3f} TFLOP/s ({emb.dtype}, {args.device})"
    )
    if args.json:
        result = {
            "model": name,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "dtype": str(emb.dtype),
            "peak_tflops": peak / 1e12,
            "best": asdict(best),
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
