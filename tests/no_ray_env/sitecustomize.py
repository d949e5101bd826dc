"""Test-only: make this interpreter look like the GPU check's machine, where Ray, DeepSpeed and faiss
are not installed (tests/test_gpu_check.py puts this directory on PYTHONPATH).

The path finder stops finding those packages, so `import ray` raises ModuleNotFoundError and
`importlib.util.find_spec("deepspeed")` returns None, exactly as when they are absent (libraries
such as accelerate probe with find_spec before importing). Nothing else changes.
"""

from __future__ import annotations

from importlib.machinery import PathFinder

HIDDEN = ("ray", "deepspeed", "faiss")
_find_spec = PathFinder.find_spec.__func__


def _hiding_find_spec(cls, fullname, path=None, target=None):  # noqa: ANN001, ANN202
    if fullname.split(".")[0] in HIDDEN:
        return None
    return _find_spec(cls, fullname, path, target)


PathFinder.find_spec = classmethod(_hiding_find_spec)
