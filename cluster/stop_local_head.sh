#!/usr/bin/env bash
# Stop only the head started by start_local_head.sh (by its session dir), not every Ray here.
set -uo pipefail
TEMP_DIR=${RAY_TEMP_DIR:-/tmp/umarvel_ray_head}
pids=$(pgrep -f -- "$TEMP_DIR" || true)
[ -n "$pids" ] && kill $pids 2>/dev/null
sleep 2
pids=$(pgrep -f -- "$TEMP_DIR" || true)
[ -n "$pids" ] && kill -9 $pids 2>/dev/null
exit 0
