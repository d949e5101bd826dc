"""Training: configs (config.py), examples (data.py) and this rank's batches (batches.py), the one
per-worker loop (worker.py) over two tasks, the embedder's stages (embedder.py) and the
re-ranker (reranker.py), with DeepSpeed (engine.py), checkpoints (checkpoint.py, which documents
the exact checkpoint/resume contract) and the Ray Train launcher (launch.py)."""
