"""Training: stage configs (stages.py), per-rank data (data.py), the DeepSpeed loop (loop.py, which
documents the exact checkpoint/resume contract) and the Ray Train launcher (trainer.py)."""
