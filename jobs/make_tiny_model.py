"""Write the toy Qwen2-VL checkpoint (random weights, local tokenizer) used by tests and the demo.

python jobs/make_tiny_model.py --out /tmp/tiny_qwen2vl --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokenizer corpus seed")
    parser.add_argument(
        "--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_vl", help="architecture"
    )
    args = parser.parse_args(argv)

    from umarvel_ray.model.backbone import count_parameters, load_backbone
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    start = time.perf_counter()
    out = make_tiny_qwen2vl(args.out, seed=args.seed, family=args.family)
    built = time.perf_counter() - start
    model, processor = load_backbone(out)
    print(
        f"tiny {args.family} written to {out}: {count_parameters(model):,} params, "
        f"vocab {len(processor.tokenizer)}, built in {built:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
