#!/usr/bin/env bash
# A screenshot of the MLflow UI comparing two chains of an output_dir's store (README's picture):
#
#   bash scripts/ui_screenshot.sh runs/ [docs/mlflow_compare.png] [RUN_NAME RUN_NAME]
#
# Serves the store with `mlflow ui` on 127.0.0.1 and opens MLflow's compare-runs page for the two chain runs
# (the two named, or the two latest finished chains) in headless Chromium, Debian's package:
#   apt-get install -y chromium
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store_dir="$(cd "${1:?usage: $0 OUTPUT_DIR [PNG] [RUN_NAME RUN_NAME]}" && pwd)"
png="$(realpath -m "${2:-$root/docs/mlflow_compare.png}")"
shift $(( $# < 2 ? $# : 2 ))
chromium="$(command -v chromium || command -v chromium-browser || true)"
[[ -n "$chromium" ]] || { echo "error: no chromium on PATH; install Debian's package: apt-get install -y chromium" >&2; exit 2; }
[[ -f "$store_dir/mlflow.db" ]] || { echo "error: $store_dir/mlflow.db not found: give the output_dir of chains run with procl run" >&2; exit 2; }
uri="sqlite:///$store_dir/mlflow.db"

# the compare page's address: the two runs' ids and their experiment's, read from the store
page="$("$root/.venv/bin/python" - "$uri" "$@" <<'EOF'
import json
import sys
from urllib.parse import quote

from mlflow import MlflowClient

uri, names = sys.argv[1], sys.argv[2:]
client = MlflowClient(uri)
experiment = client.get_experiment_by_name("procl")
chains = client.search_runs([experiment.experiment_id], "tags.`procl.kind` = 'chain' and attributes.status = 'FINISHED'",
                            order_by=["attributes.start_time DESC"])
picked = [r for r in chains if r.info.run_name in names] if names else chains[:2]
if len(picked) != 2:
    sys.exit(f"error: need two finished chain runs in {uri}, found {[r.info.run_name for r in picked]}")
ids = [r.info.run_id for r in picked]
print(f"#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([experiment.experiment_id]))}")
EOF
)"

port="$("$root/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$root/.venv/bin/mlflow" ui --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" > /tmp/procl-mlflow-ui.log 2>&1 &
server=$!
profile="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null; rm -rf "$profile"' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/health" > /dev/null || { echo "error: mlflow ui did not start (log: /tmp/procl-mlflow-ui.log)" >&2; exit 1; }

mkdir -p "$(dirname "$png")"
# the flags keep Chromium off the network it cannot reach here, and give the page's scripts time to draw
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars --window-size=1600,1200 \
    --virtual-time-budget=20000 --screenshot="$png" "http://127.0.0.1:$port/$page" 2> /dev/null
echo "wrote $png"
