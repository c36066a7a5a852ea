#!/usr/bin/env bash
# Headless locust run of bench/locustfile.py against a running recommender.
#
#   TARGET=http://127.0.0.1:8000 DURATION=60s USERS=50 SPAWN_RATE=10 OUT=docs/load bash bench/run_load.sh
#
# Writes locust's CSVs (OUT/locust_stats.csv, _stats_history.csv, _failures.csv,
# _exceptions.csv) and exits non-zero if the target is not ready or any request failed.
# Extra arguments are passed to locust (e.g. --tags, --loglevel).
set -euo pipefail

TARGET="${TARGET:-http://127.0.0.1:8000}"
DURATION="${DURATION:-60s}"
USERS="${USERS:-50}"
SPAWN_RATE="${SPAWN_RATE:-10}"
OUT="${OUT:-docs/load}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Fail fast with a clear message rather than recording a run full of connection errors.
if ! python - "$TARGET" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/ready", timeout=5)
except Exception as exc:
    sys.exit(f"run_load: {sys.argv[1]} is not ready ({exc})")
PY
then
    exit 1
fi

mkdir -p "$OUT"
echo "run_load: ${USERS} users (spawn ${SPAWN_RATE}/s) for ${DURATION} against ${TARGET} -> ${OUT}/locust_*.csv"

# locust exits 1 when any request failed (its default --exit-code-on-error).
locust -f "${here}/locustfile.py" \
    --headless \
    --host "$TARGET" \
    --users "$USERS" \
    --spawn-rate "$SPAWN_RATE" \
    --run-time "$DURATION" \
    --csv "${OUT}/locust" \
    --only-summary \
    "$@"
