#!/usr/bin/env bash
# Start a single-node Ray head on loopback with a dashboard, for `ray job submit` on a laptop.
# Stop it with cluster/stop_local_head.sh (never `ray stop`, which kills every Ray on the machine).
# AGENT_PORT: the dashboard agent's HTTP port, which serves job submission; when another Ray on the
# machine holds it (52365 by default), the agent starts without HTTP and `ray job submit` answers
# "No available agent to submit job".
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
RAY=${RAY:-ray}
TEMP_DIR=${RAY_TEMP_DIR:-/tmp/umarvel_ray_head}
"$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --port="${RAY_PORT:-6390}" --dashboard-port="${DASHBOARD_PORT:-8265}" \
    --dashboard-agent-listen-port="${AGENT_PORT:-52365}" \
    --num-cpus="${NUM_CPUS:-2}" --object-store-memory="${OBJECT_STORE_BYTES:-500000000}" \
    --temp-dir="$TEMP_DIR" --disable-usage-stats
echo "submit with: ray job submit --address http://127.0.0.1:${DASHBOARD_PORT:-8265} --working-dir . -- python jobs/recipe.py --config jobs/configs/toy.yaml"
