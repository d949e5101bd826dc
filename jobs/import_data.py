"""Build an M-BEIR-layout directory from your own images and captions, then validate it.

    python jobs/import_data.py source=captions.csv images=photos/ out_dir=data/myphotos name=myphotos
    python jobs/import_data.py source=annotations/captions_train2017.json images=train2017/ \\
        out_dir=data/coco_own name=cocoown format=coco
    python jobs/import_data.py source=saved_hf_dataset/ out_dir=data/hf_own name=hfown format=hf

Writes text->image (task 0), image->text (task 3) and, where items have several images,
image->image (task 4) tasks with train/test splits by item, local pools, qrels, images under
mbeir_images/<name>/ and an editable instructions/query_instructions.tsv; then runs the validator.
Rejected rows are printed with FILE:LINE; the SUMMARY line has rows_in = rows_out + rows_rejected.
Exit codes: 0 done, 2 bad config or unusable source, 1 any other failure.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job
from umarvel_ray.data.import_config import ImportConfig
from umarvel_ray.data.importer import ImportResult, run_import
from umarvel_ray.progress import summary


def _import(cfg: ImportConfig) -> ImportResult:
    """Run the import and print rejected rows, per-split query counts and the SUMMARY line."""
    res = run_import(cfg)
    for line in res.rejected:
        print(f"REJECTED {line}", flush=True)
    for split, counts in res.splits.items():
        print(f"{split}: " + ", ".join(f"{k} {v} queries" for k, v in counts.items()), flush=True)
    summary(
        "import_data",
        rows_in=res.rows_in,
        rows_out=res.rows_out,
        rows_rejected=res.rows_rejected,
        files=len(res.files),
        out_dir=str(res.out_dir),
    )
    return res


def main(argv: list[str] | None = None) -> int:
    return run_job(ImportConfig, _import, argv, __doc__, "import")


if __name__ == "__main__":
    sys.exit(main())
