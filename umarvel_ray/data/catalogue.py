"""The M-BEIR benchmark's catalogue: its ten datasets, its task ids and the 16 evaluation tasks.

Dataset ids and task ids are UniIR's numbering (M-BEIR's files carry them in every id and query);
`MBEIR_TASKS` lists the 16 evaluation tasks in the column order of M-BEIR's published results
table, each with its files and the k it is scored at (R@10 for the two Fashion datasets, R@5 for
the rest). Where the files of a directory are found and which other tasks it holds is
`data.tasks`; how the records in those files look is `data.mbeir`.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASET_IDS: dict[str, int] = {
    "VisualNews": 0,
    "Fashion200K": 1,
    "WebQA": 2,
    "EDIS": 3,
    "NIGHTS": 4,
    "OVEN": 5,
    "InfoSeek": 6,
    "FashionIQ": 7,
    "CIRR": 8,
    "MSCOCO": 9,
}
DATASET_NAMES: dict[int, str] = {v: k for k, v in DATASET_IDS.items()}

# task_id -> (query modality, candidate modality). Task 5 (image -> image,text) exists in UniIR's
# numbering but has no M-BEIR evaluation task; it is kept so that ids 0..8 all resolve.
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    5: ("image", "image,text"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

_SHORT = {"text": "t", "image": "i", "image,text": "(i,t)"}


def task_modalities(task_id: int) -> tuple[str, str]:
    """(query_modality, cand_modality) of an M-BEIR task id; the pool modality is implied by it."""
    try:
        return TASK_MODALITIES[int(task_id)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown M-BEIR task_id {task_id!r} (expected 0..8)") from None


@dataclass(frozen=True)
class TaskSpec:
    """One of the 16 M-BEIR evaluation tasks: where its files are and which k it is scored at."""

    name: str
    dataset: str
    dataset_id: int
    task_id: int
    k: int
    label: str
    query_file: str
    pool_file: str
    qrels_file: str

    @property
    def query_modality(self) -> str:
        return task_modalities(self.task_id)[0]

    @property
    def cand_modality(self) -> str:
        return task_modalities(self.task_id)[1]


def _task(dataset: str, task_id: int) -> TaskSpec:
    low = dataset.lower()
    qm, cm = task_modalities(task_id)
    return TaskSpec(
        name=f"{low}_task{task_id}",
        dataset=dataset,
        dataset_id=DATASET_IDS[dataset],
        task_id=task_id,
        k=10 if dataset in ("Fashion200K", "FashionIQ") else 5,
        label=f"{dataset} {_SHORT[qm]}->{_SHORT[cm]}",
        query_file=f"query/test/mbeir_{low}_task{task_id}_test.jsonl",
        pool_file=f"cand_pool/local/mbeir_{low}_task{task_id}_cand_pool.jsonl",
        qrels_file=f"qrels/test/mbeir_{low}_task{task_id}_test_qrels.txt",
    )



# The column order of M-BEIR's published results table.
MBEIR_TASKS: list[TaskSpec] = [
    _task("VisualNews", 0),
    _task("MSCOCO", 0),
    _task("Fashion200K", 0),
    _task("WebQA", 1),
    _task("EDIS", 2),
    _task("WebQA", 2),
    _task("VisualNews", 3),
    _task("MSCOCO", 3),
    _task("Fashion200K", 3),
    _task("NIGHTS", 4),
    _task("OVEN", 6),
    _task("InfoSeek", 6),
    _task("FashionIQ", 7),
    _task("CIRR", 7),
    _task("OVEN", 8),
    _task("InfoSeek", 8),
]
TASKS_BY_NAME: dict[str, TaskSpec] = {t.name: t for t in MBEIR_TASKS}


def get_task(name: str) -> TaskSpec:
    """TaskSpec by name ("mscoco_task0"); KeyError lists the valid names."""
    try:
        return TASKS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS_BY_NAME)}") from None
