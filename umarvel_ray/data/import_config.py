"""`ImportConfig`: the settings of `jobs/import_data.py`, shared by the importer and its source
readers (`data.import_sources`)."""

from __future__ import annotations

from dataclasses import dataclass

from umarvel_ray.config import option

FORMATS = ("auto", "table", "coco", "hf")


@dataclass
class ImportConfig:
    """`jobs/import_data.py` settings."""

    out_dir: str = option("", "the M-BEIR-layout directory to write (must be empty or absent)", path="cwd")
    source: str = option("", "captions table (.csv/.jsonl/.parquet), COCO caption json, or a saved HF dataset dir", path="cwd")
    images: str = option("", "folder the table's / COCO json's image paths are relative to", path="cwd")
    format: str = option("auto", "auto (by file suffix / directory) | table | coco | hf")
    name: str = option("mydata", "dataset name in the file names (lower-case letters, digits, _ and -)")
    dataset_id: int = option(20, "dataset id in every qid/did (M-BEIR uses 0-9; pick 10 or more)")
    image_column: str = option("image", "table / HF column holding the image (path; HF: image)")
    caption_column: str = option("caption", "table / HF column holding the caption (HF: str or list)")
    split_column: str = option("split", "optional column with train/test; absent = hashed split by item")
    id_column: str = option("id", "optional column naming the item (several images of one item)")
    test_fraction: float = option(0.2, "share of items in test when there is no split column")
    seed: int = option(0, "seed of the hashed split")
    tasks: list[int] = option([0, 3, 4], "task ids to write: 0 text->image, 3 image->text, 4 image->image")
    missing_images: str = option("skip", "skip (reject the row, counted with FILE:LINE) | error (stop)")
    overwrite: bool = option(False, "replace an existing non-empty out_dir")
