"""Training throughput: samples/s and peak RSS for 1 vs N data-parallel workers, and GPU MFU.

    python jobs/bench_train.py --quick                   # CPU, tiny model, 1 vs 2 workers, < 1 min
    python jobs/bench_train.py --workers 1,2 --steps 20 --batch 32 --zero 2
    python jobs/bench_train.py --mode mfu --size 2b --device cuda   # Qwen2-VL-2B-sized LoRA step

Scaling mode runs the real training step (`umarvel_ray.train.embedder.train_step`: DeepSpeed engine,
LoRA embedder, gathered InfoNCE) in N processes over gloo, one torch thread each (weak scaling:
fixed per-worker batch, so in-batch negatives grow with N). Scaling efficiency =
samples/s(N) / (N x samples/s(1)). Peak RSS is each worker's ru_maxrss.

MFU mode times one worker's LoRA step in bf16 with gradient checkpointing, through DeepSpeed or
(`--engine torch`, no DeepSpeed or Ray needed: jobs/gpu_check.sh) the same `train_step` driving
`umarvel_ray.train.torch_engine.TorchEngine` (bf16 module, fp32 masters, AdamW, clipping). Model FLOPs per step =
forward FLOPs of every chunk (counted as in jobs/bench_model.py from real tokens and patches) +
one more language-model forward for the input-gradient backward (base weights are frozen, so no
weight gradients; the frozen vision tower has no backward; recomputation is not counted, as usual
for MFU). The peak is the best large matmul measured on the same device and dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["scaling", "mfu"], default="scaling")
    p.add_argument("--workers", default="1,2", help="scaling mode: comma-separated worker counts")
    p.add_argument(
        "--batch", type=int, default=0, help="queries per worker per step (default 16 cpu / 32 gpu)"
    )
    p.add_argument("--micro-batch", type=int, default=0, help="GradCache micro-batch (0 = off)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 10, --quick 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage")
    p.add_argument("--images", type=float, default=0.5, help="fraction of candidates that are images")
    p.add_argument("--size", choices=["tiny", "2b"], default="tiny", help="mfu mode: model size")
    p.add_argument("--device", default="cpu", help="mfu mode: cpu or cuda")
    p.add_argument(
        "--engine", choices=["deepspeed", "torch"], default="deepspeed",
        help="mfu mode: DeepSpeed engine, or TorchEngine (plain PyTorch, one process, no DeepSpeed)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (scaling mode)")
    p.add_argument("--quick", action="store_true", help="CI smoke run (< 1 min on 2 cores)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def _items(n: int, image_fraction: float, side: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Synthetic (query, positive) pairs: text queries, image or text candidates."""
    import numpy as np

    rng = np.random.RandomState(seed)
    words = ["small", "red", "circle", "left", "of", "a", "large", "blue", "square", "above", "two", "green"]
    queries, cands = [], []
    for i in range(n):
        text = " ".join(words[(i * 7 + k * 3 + seed) % len(words)] for k in range(16)).capitalize() + "."
        queries.append(
            {"text": text, "image": None, "instruction": "Retrieve an image that matches the caption."}
        )
        if rng.rand() < image_fraction:
            cands.append(
                {
                    "text": None,
                    "image": rng.randint(0, 256, (side, side, 3), dtype=np.uint8),
                    "instruction": None,
                }
            )
        else:
            cands.append({"text": text[::-1], "image": None, "instruction": None})
    return queries, cands


def _batch(embedder: Any, n: int, micro: int, image_fraction: float, side: int, seed: int) -> SimpleNamespace:
    import torch

    from umarvel_ray.model.losses import split_chunks, stable_id

    queries, cands = _items(n, image_fraction, side, seed)
    rows = split_chunks(n, micro or n)
    return SimpleNamespace(
        chunks={
            "query": [embedder.collate(queries[s], True) for s in rows],
            "positive": [embedder.collate(cands[s], False) for s in rows],
        },
        pos_ids=torch.tensor([stable_id(f"{seed}:{i}") for i in range(n)]),
        neg_ids=None,
        query_ids=torch.tensor([stable_id(f"q{seed}:{i}") for i in range(n)]),
        scores=None,
        cand_mask=None,
    )


def _engine(embedder: Any, zero: int, batch: int, micro: int, bf16: bool) -> Any:
    from umarvel_ray.train.config import TrainConfig
    from umarvel_ray.train.embedder import TrainModule
    from umarvel_ray.train.engine import deepspeed_config, import_deepspeed

    ds = import_deepspeed()
    cfg = TrainConfig(data_kind="nli", per_device_batch=batch, micro_batch=micro, zero_stage=zero, lr=1e-4)
    module = TrainModule(embedder, zero)
    engine, *_ = ds.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, bf16=bf16),
    )
    return engine, cfg


def _timed_steps(engine: Any, cfg: Any, batches: list[Any], warmup: int, steps: int, sync: Any) -> float:
    from umarvel_ray.train.embedder import make_loss_fn, train_step

    for i in range(warmup):
        train_step(engine, batches[i % len(batches)], make_loss_fn(cfg, batches[i % len(batches)]))
    sync()
    t = time.perf_counter()
    for i in range(steps):
        b = batches[i % len(batches)]
        train_step(engine, b, make_loss_fn(cfg, b))
    sync()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ scaling


def _scaling_worker(rank: int, world: int, port: int, args: dict, model_dir: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args["threads"])
    from umarvel_ray.model.embedder import Embedder, EmbedderConfig, LoraConfig
    from umarvel_ray.train.engine import init_distributed

    init_distributed(use_gpu=False)
    torch.manual_seed(0)
    emb = Embedder.build(EmbedderConfig(model=model_dir, learn_tau=True, lora=LoraConfig(r=16, alpha=32)))
    engine, cfg = _engine(emb, args["zero"], args["batch"], args["micro"], bf16=False)
    batches = [
        _batch(emb, args["batch"], args["micro"], args["images"], 84, seed=rank * 100 + i) for i in range(3)
    ]
    dist.barrier()
    seconds = _timed_steps(engine, cfg, batches, args["warmup"], args["steps"], dist.barrier)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "rss_mb": rss_mb}))
    dist.destroy_process_group()


def run_scaling(args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    rows = []
    with tempfile.TemporaryDirectory(prefix="umarvel_bench_train_") as tmp:
        model_dir = str(make_tiny_qwen2vl(Path(tmp) / "tiny", seed=0))
        for world in [int(w) for w in args.workers.split(",") if w]:
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            wargs = dict(
                threads=args.threads,
                zero=args.zero,
                batch=args.batch,
                micro=args.micro_batch,
                images=args.images,
                warmup=args.warmup,
                steps=args.steps,
            )
            mp.spawn(_scaling_worker, args=(world, port, wargs, model_dir, str(out)), nprocs=world, join=True)
            res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            seconds = max(r["seconds"] for r in res)
            rows.append(
                {
                    "workers": world,
                    "per_worker_batch": args.batch,
                    "global_batch": world * args.batch,
                    "steps": args.steps,
                    "seconds": seconds,
                    "samples_per_s": world * args.batch * args.steps / seconds,
                    "peak_rss_mb": max(r["rss_mb"] for r in res),
                }
            )
    base = rows[0]["samples_per_s"] / rows[0]["workers"]
    for r in rows:
        r["scaling_efficiency"] = r["samples_per_s"] / (r["workers"] * base)
    return rows


# ------------------------------------------------------------------------------------ MFU


def run_mfu(args: argparse.Namespace) -> dict:
    import torch
    from bench_model import batch_flops, build_2b, matmul_peak

    from umarvel_ray.model.embedder import LM_LORA_TARGETS, Embedder, EmbedderConfig, LoraConfig
    from umarvel_ray.model.inputs import ensure_added_tokens

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    if args.engine == "deepspeed":
        from umarvel_ray.train.engine import init_distributed

        os.environ.setdefault("MASTER_PORT", "29533")
        init_distributed(use_gpu=cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory(prefix="umarvel_bench_mfu_") as tmp:
        if args.size == "2b":
            inference = build_2b(args.device, dtype, Path(tmp))
            model, processor = inference.model, inference.processor
        else:
            from umarvel_ray.model.backbone import load_backbone
            from umarvel_ray.model.tiny import make_tiny_qwen2vl

            model, processor = load_backbone(make_tiny_qwen2vl(Path(tmp) / "tiny", seed=0), dtype=dtype)
            model = model.to(args.device)
            ensure_added_tokens(processor.tokenizer, model)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model.requires_grad_(False)
    model = get_peft_model(
        model,
        PeftLoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=LM_LORA_TARGETS, bias="none"),
    )
    cfg = EmbedderConfig(
        model=f"random:{args.size}",
        lora=LoraConfig(r=128, alpha=256),
        learn_tau=True,
        gradient_checkpointing=True,
        dtype=str(dtype).replace("torch.", ""),
    )
    emb = Embedder(model, processor, cfg).to(args.device)
    emb.set_gradient_checkpointing(True)
    emb.train()
    side = 448 if args.size == "2b" else 84
    batches = [_batch(emb, args.batch, args.micro_batch, args.images, side, seed=i) for i in range(2)]
    if args.engine == "torch":
        from umarvel_ray.train.config import TrainConfig
        from umarvel_ray.train.embedder import TrainModule
        from umarvel_ray.train.torch_engine import TorchEngine

        tcfg = TrainConfig(data_kind="nli", per_device_batch=args.batch, micro_batch=args.micro_batch, lr=1e-4)
        engine = TorchEngine(TrainModule(emb), lr=tcfg.lr, grad_clip=tcfg.grad_clip, bf16=cuda)
    else:
        engine, tcfg = _engine(emb, args.zero, args.batch, args.micro_batch, bf16=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed_steps(engine, tcfg, batches, args.warmup, args.steps, sync)
    lm = emb.base_model.model.language_model
    lm_linear = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    flops = []
    for b in batches:
        f = 0.0
        for chunks in b.chunks.values():
            for c in chunks:  # forward + the language model's input-gradient backward
                lengths = c["attention_mask"].sum(1).double()
                f += batch_flops(emb, c) + 2.0 * lm_linear * float(lengths.sum())
        flops.append(f)
    per_step = sum(flops[i % len(flops)] for i in range(args.steps)) / args.steps
    peak = matmul_peak(args.device, dtype, args.quick)
    achieved = per_step * args.steps / seconds
    return {
        "engine": args.engine,
        "model": f"random Qwen2-VL-{args.size}",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype),
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "seconds": seconds,
        "samples_per_s": args.batch * args.steps / seconds,
        "tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": achieved / peak,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (32 if cuda else (8 if args.quick else 16))
    args.steps = args.steps or (4 if args.quick else 10)
    if args.mode == "scaling":
        rows = run_scaling(args)
        print(f"{'workers':>7} {'global batch':>12} {'samples/s':>10} {'efficiency':>10} {'peak RSS MB':>11}")
        for r in rows:
            print(
                f"{r['workers']:>7} {r['global_batch']:>12} {r['samples_per_s']:>10.1f} "
                f"{r['scaling_efficiency']:>10.0%} {r['peak_rss_mb']:>11.0f}"
            )
        result: Any = rows
    else:
        result = run_mfu(args)
        print(
            f"{result['model']} on {result['device']} ({result['dtype']}), batch {result['batch']}: "
            f"{result['samples_per_s']:.1f} samples/s, {result['tflops']:.1f} TFLOP/s of "
            f"{result['peak_tflops']:.1f} peak -> MFU {result['mfu']:.1%}, peak memory {result['peak_mem_gb']:.1f} GB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
