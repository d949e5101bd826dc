"""Validate an M-BEIR directory: `python jobs/validate_data.py DIR [--check-images] [--max-errors N]`.

Prints per-file rows/errors, the first errors as FILE:LINE: field 'NAME': message, and the
positives absent from each task's pools; exits 1 when any file has errors.
"""

from __future__ import annotations

import argparse
import sys

from umarvel_ray.data.validate import validate_dir
from umarvel_ray.progress import setup_logging, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="M-BEIR root (holds query/, cand_pool/, qrels/, instructions/)")
    ap.add_argument("--check-images", action="store_true", help="also check that every image path exists")
    ap.add_argument("--max-errors", type=int, default=50, help="how many error lines to print")
    args = ap.parse_args(argv)
    setup_logging()
    report = validate_dir(args.dir, check_images=args.check_images)
    print(report.format(max_errors=args.max_errors))
    summary(
        "validate_data",
        files=len(report.files),
        rows=sum(f.rows for f in report.files),
        errors=report.errors,
        missing_local_positives=sum(p.missing_local for p in report.positives),
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
