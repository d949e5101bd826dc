#!/usr/bin/env bash
# Create .venv and install umarvel-ray with its dev extras (CPU torch, faiss-cpu, pytest, ruff).
# GPU machines: install your CUDA torch into .venv first (see README), then run this with
# EXTRAS=gpu so faiss-gpu replaces faiss-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # Pinned: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[${EXTRAS}]"
