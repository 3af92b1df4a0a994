#!/usr/bin/env bash
# Start a local Ray head (token authentication on, as Ray 2.60 does by default), submit a fedsim run
# to it as a job, wait for it, and check the job succeeded and its run reached MLflow.
#   bash clusters/local_job.sh [CONFIG] [extra `fedsim run` args...]
# Run from the repository root with fedsim installed (the job uses this Python environment, so the
# runtime env only ships the working directory; on a real cluster use clusters/runtime_env.yaml).
set -euo pipefail
config=${1:-configs/tiny.yaml}; shift || true
export RAY_AUTH_MODE=token   # clients must send the token the head wrote to ~/.ray/auth_token
port=${FEDSIM_DASHBOARD_PORT:-8265}
tracking="sqlite:///$PWD/mlflow.db"
ray stop --force >/dev/null 2>&1 || true
ray start --head --num-cpus "${FEDSIM_HEAD_CPUS:-4}" --dashboard-port "$port" --include-dashboard true \
  --disable-usage-stats >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
summary=$(mktemp --suffix .json)
ray job submit --address "http://127.0.0.1:$port" --working-dir . \
  --runtime-env-json '{"excludes": ["/runs/", "/.venv/", "/venv/", "/mlflow.db", "/.git/", "*.parquet"]}' \
  -- python -m fedsim.cli run "$config" --tracking-uri "$tracking" --set "output_dir=$PWD/runs" \
     --summary-json "$summary" "$@"
python - "$summary" "$tracking" <<'PY'
import json, sys
from mlflow import MlflowClient
s = json.load(open(sys.argv[1]))
run = MlflowClient(tracking_uri=sys.argv[2]).get_run(s["mlflow_run_id"])
assert run.info.status == "FINISHED", run.info.status
print(f"job ok: MLflow run {run.info.run_id} FINISHED, auc={run.data.metrics['auc']:.4f}")
PY
