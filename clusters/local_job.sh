#!/usr/bin/env bash
# Start a local Ray head (token authentication on, as Ray 2.60 does by default), submit a fedsim run
# or sweep to it as a job, wait for it, and check that the job succeeded and its results reached MLflow.
#   bash clusters/local_job.sh [run] [CONFIG] [extra `fedsim run` args...]      (default configs/tiny.yaml)
#   bash clusters/local_job.sh tune [SWEEP] [extra `fedsim tune` args...]       (default tuning/ci_small.yaml)
# Run from the repository root with fedsim installed: the job runs in this Python environment and the
# runtime env ships the working directory. On a real cluster use clusters/runtime_env.yaml instead.
# The head runs in the foreground of a child process (--block) and is stopped by ending that process,
# so other Ray instances on the machine are left alone.
set -euo pipefail
command=run
case "${1:-}" in run|tune) command=$1; shift ;; esac
default=configs/tiny.yaml; [ "$command" = tune ] && default=tuning/ci_small.yaml
file=${1:-$default}; shift || true
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
# Token auth is on: the head refuses a request without the token (401) or with a wrong one (403).
no=$(curl -s -o /dev/null -w '%{http_code}' "$address/api/jobs/")
bad=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer not-the-token' "$address/api/jobs/")
if [ "$no" != 401 ] || [ "$bad" != 403 ]; then
  echo "the head answered $no without a token and $bad with a wrong one (401 and 403 expected)"; exit 1
fi
echo "auth ok: the head refuses a request without the token (401) and with a wrong one (403)"
summary=$(mktemp --suffix .json)
job=fedsim-$(date +%s)
for try in $(seq 30); do  # "No available agent" until the head's agent registers: retry the submission only
  ray job submit --address "$address" --no-wait --submission-id "$job" --working-dir . \
    --runtime-env-json '{"excludes": ["/runs/", "/.venv/", "/venv/", "/mlflow.db", "/.git/", "*.parquet", "/.whl/"]}' \
    -- python -m fedsim.cli "$command" "$file" --tracking-uri "$tracking" --set "output_dir=$PWD/runs" \
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
client = MlflowClient(tracking_uri=sys.argv[2])
if "parent_run_id" in s:  # a sweep: the parent run and one finished nested run per trial
    parent = client.get_run(s["parent_run_id"])
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED", parent.info.status
    assert len(nested) == len(s["trials"]) and all(r.info.status == "FINISHED" for r in nested), nested
    print(f"job ok: MLflow parent run {parent.info.run_id} FINISHED with {len(nested)} nested trial runs, "
          f"{s['completed']}/{len(s['trials'])} trials finished in {s['wall_seconds']:.0f} s")
else:
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED", run.info.status
    print(f"job ok: MLflow run {run.info.run_id} FINISHED, auc={run.data.metrics['auc']:.4f}")
PY
