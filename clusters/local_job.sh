#!/usr/bin/env bash
# Start a local Ray head (token authentication on, as Ray 2.60 does by default), submit a fedsim run
# to it as a job, wait for it, and check that the job succeeded and its run reached MLflow.
#   bash clusters/local_job.sh [CONFIG] [extra `fedsim run` args...]
# Run from the repository root with fedsim installed: the job runs in this Python environment and the
# runtime env ships the working directory. On a real cluster use clusters/runtime_env.yaml instead.
# The head runs in the foreground of a child process (--block) and is stopped by ending that process,
# so other Ray instances on the machine are left alone.
set -euo pipefail
config=${1:-configs/tiny.yaml}; shift || true
export RAY_AUTH_MODE=token   # clients must send the token the head writes to ~/.ray/auth_token
# Own ports, so this head never collides with another Ray instance on the machine.
gcs_port=${FEDSIM_GCS_PORT:-6391}; dash_port=${FEDSIM_DASHBOARD_PORT:-8271}; agent_port=${FEDSIM_AGENT_PORT:-52375}
tracking="sqlite:///$PWD/mlflow.db"
ray start --head --block --port "$gcs_port" --dashboard-port "$dash_port" --include-dashboard true \
  --dashboard-agent-listen-port "$agent_port" \
  --num-cpus "${FEDSIM_HEAD_CPUS:-4}" --disable-usage-stats > /tmp/fedsim-head.log 2>&1 &
head=$!
trap 'kill $head 2>/dev/null; wait $head 2>/dev/null || true' EXIT
address="http://127.0.0.1:$dash_port"
for _ in $(seq 120); do  # the job server takes a few seconds to come up
  ray job list --address "$address" >/dev/null 2>&1 && break
  kill -0 $head 2>/dev/null || { cat /tmp/fedsim-head.log; exit 1; }
  sleep 1
done
summary=$(mktemp --suffix .json)
job=fedsim-$(date +%s)
for try in $(seq 30); do  # "No available agent" until the head's agent registers: retry the submission only
  ray job submit --address "$address" --no-wait --submission-id "$job" --working-dir . \
    --runtime-env-json '{"excludes": ["/runs/", "/.venv/", "/venv/", "/mlflow.db", "/.git/", "*.parquet", "/.whl/"]}' \
    -- python -m fedsim.cli run "$config" --tracking-uri "$tracking" --set "output_dir=$PWD/runs" \
       --summary-json "$summary" "$@" > /tmp/fedsim-submit.log 2>&1 && break
  [ "$try" = 30 ] && { cat /tmp/fedsim-submit.log; exit 1; }
  sleep 2
done
ray job logs --address "$address" --follow "$job"
status=$(ray job status --address "$address" "$job" 2>&1)
grep -q "Job '$job' succeeded" <<<"$status" || { echo "$status"; echo "job $job did not succeed"; exit 1; }
python - "$summary" "$tracking" <<'PY'
import json, sys
from mlflow import MlflowClient
s = json.load(open(sys.argv[1]))
run = MlflowClient(tracking_uri=sys.argv[2]).get_run(s["mlflow_run_id"])
assert run.info.status == "FINISHED", run.info.status
print(f"job ok: MLflow run {run.info.run_id} FINISHED, auc={run.data.metrics['auc']:.4f}")
PY
