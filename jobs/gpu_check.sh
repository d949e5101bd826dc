#!/usr/bin/env bash
# One GPU check (issue #14) for a single H100/H200 with torch, transformers and peft installed and
# no Ray, DeepSpeed or faiss (the Ray wheel cannot travel to that machine). < 10 minutes in all.
#
#   bash jobs/gpu_check.sh                          # on the GPU machine, from anywhere
#   GPU_CHECK_CPU_SMOKE=1 bash jobs/gpu_check.sh    # every piece at toy size on CPU (tests/test_gpu_check.py)
#
# Checks (each a command of its own; the table says which ran and what it measured):
#   1. pytest -m "gpu and not ray" on the test files that hold GPU tests (tests needing DeepSpeed or
#      faiss-gpu skip, with their reason in the table)
#   2. forward MFU:  jobs/bench_model.py --size 2b --dtype bfloat16 --device cuda          goal >= 40%
#   3. LoRA step MFU: jobs/bench_train.py --mode mfu --size 2b --device cuda --engine torch goal >= 35%
#   4. embedding loop vs model-only: jobs/bench_embed.py --no-ray --size 2b --device cuda    goal >= 0.90
#   5. exact search, torch on GPU vs CPU (faiss-cpu if importable, else torch; the table says which)
#      on 1M x 256 synthetic vectors: jobs/bench_search.py --device cuda      goal: same top-k ids
# Prints one table (jobs/gpu_check_table.py) and writes it with every piece's JSON and log under
# $GPU_CHECK_OUT (default: a new temp dir). Exit 0 when every check ran and met its goal (smoke
# mode: when every piece ran), 1 otherwise. Env: PYTHON (default python).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"

if [ "${GPU_CHECK_CPU_SMOKE:-0}" = 1 ]; then
    MODE=smoke
    MODEL_ARGS=(--quick --batch-sizes 1,4 --device cpu)
    TRAIN_ARGS=(--mode mfu --size tiny --device cpu --quick --engine torch)
    EMBED_ARGS=(--no-ray --quick --device cpu)
    SEARCH_ARGS=(--vectors 20000 --dim 64 --queries 256 --device cpu)
    LIMITS=(240 120 120 120 60)
else
    MODE=gpu
    MODEL_ARGS=(--size 2b --dtype bfloat16 --device cuda --batch-sizes 8,32)
    TRAIN_ARGS=(--mode mfu --size 2b --device cuda --engine torch --batch 32 --steps 10)
    EMBED_ARGS=(--no-ray --size 2b --dtype bfloat16 --device cuda --batch-size 32 --rows 2048)
    SEARCH_ARGS=(--device cuda)
    LIMITS=(150 120 150 120 60)  # seconds per piece: 10 minutes at most in all
fi

# run NAME LIMIT CMD...: the piece's output goes to $OUT/NAME.log, its exit code to $OUT/NAME.rc
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    echo "   exit $rc after $((SECONDS - start))s (log: $OUT/$name.log)"
}

mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
run pytest "${LIMITS[0]}" "$PY" -m pytest -m "gpu and not ray" -q -rs -p no:cacheprovider \
    --junitxml "$OUT/pytest.xml" "${GPU_TESTS[@]}"
run forward "${LIMITS[1]}" "$PY" jobs/bench_model.py "${MODEL_ARGS[@]}" --json "$OUT/forward.json"
run train "${LIMITS[2]}" "$PY" jobs/bench_train.py "${TRAIN_ARGS[@]}" --json "$OUT/train.json"
run embed "${LIMITS[3]}" "$PY" jobs/bench_embed.py "${EMBED_ARGS[@]}" --json "$OUT/embed.json"
run search "${LIMITS[4]}" "$PY" jobs/bench_search.py "${SEARCH_ARGS[@]}" --json "$OUT/search.json"
"$PY" jobs/gpu_check_table.py --mode "$MODE" "$OUT"
