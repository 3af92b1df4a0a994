#!/usr/bin/env bash
# MLflow UI screenshots of the newest fedsim run in a sqlite store, in headless Chromium (apt install chromium).
#   bash benchmarks/mlflow_screenshots.sh mlflow.db docs/img
set -eu
db=$(realpath "$1"); out=$2; port=${FEDSIM_UI_PORT:-5056}
setsid mlflow ui --backend-store-uri "sqlite:///$db" --port $port --host 127.0.0.1 > "${TMPDIR:-/tmp}/fedsim-mlflow-ui.log" 2>&1 &
ui=$!; trap "kill -- -$ui; wait $ui 2>/dev/null" EXIT  # the server and its workers
for _ in $(seq 60); do curl -sf -o /dev/null http://127.0.0.1:$port/ && break; sleep 1; done
read exp run < <(python -c "
from mlflow import MlflowClient
c=MlflowClient('sqlite:///$db'); e=c.get_experiment_by_name('fedsim'); r=c.search_runs([e.experiment_id], order_by=['attributes.start_time DESC'])[0]
print(e.experiment_id, r.info.run_id)")
shot(){ timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1700,1000 --virtual-time-budget=25000 --screenshot="$out/$1" "http://127.0.0.1:$port/#/experiments/$exp$2" > /dev/null 2>&1; }
shot mlflow_runs.png "/runs?workflowType=machine_learning"
shot mlflow_run.png "/runs/$run?workflowType=machine_learning"
shot mlflow_metrics.png "/runs/$run/model-metrics?workflowType=machine_learning"
ls -la "$out"
