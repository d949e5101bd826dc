"""Write the toy M-BEIR benchmark (real layout, 16 tasks, rendered scenes) used by tests and the demo.

python jobs/make_toy_mbeir.py --out /tmp/toy_mbeir --size small --seed 0 [--workers 2] [--validate]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="output directory (empty, missing, or a previous toy build)"
    )
    parser.add_argument(
        "--size", default="small", choices=["small", "medium"], help="small: CI, medium: demo"
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes for image rendering (bytes unchanged)"
    )
    parser.add_argument(
        "--validate", action="store_true", help="run validate_dir(check_images=True) afterwards"
    )
    args = parser.parse_args(argv)

    from umarvel_ray.data.toy.builder import INFO_FILE, make_toy_mbeir
    from umarvel_ray.progress import setup_logging, summary

    setup_logging()
    start = time.perf_counter()
    out = make_toy_mbeir(args.out, size=args.size, seed=args.seed, workers=args.workers)
    seconds = time.perf_counter() - start
    info = json.loads((out / INFO_FILE).read_text())
    errors = 0
    if args.validate:
        from umarvel_ray.data.validate import validate_dir

        report = validate_dir(out, check_images=True)
        errors = report.errors
        if not report.ok:
            print(report.format())
    summary(
        "make_toy_mbeir",
        out=out,
        size=args.size,
        seed=args.seed,
        test_queries=sum(t["queries"] for t in info["test"].values()),
        union_test_pool=info["union_test_pool"],
        train_queries=info["train"]["queries"],
        train_pool=info["train"]["pool"],
        images=info["images"],
        seconds=f"{seconds:.1f}",
        **({"validate_errors": errors} if args.validate else {}),
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
