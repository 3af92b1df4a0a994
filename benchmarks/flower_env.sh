#!/usr/bin/env bash
# Builds benchmarks/.flower-venv: Flower's simulation engine for benchmarks/flower_bench.py.
#
# flwr[simulation]==1.41.0 pins ray==2.55.1 while fedsim runs on Ray 2.60, so Flower gets a virtual
# environment of its own instead of a project extra. (1.42.0 needs a certifi release that some
# package mirrors lack.) The benchmark builds its model from transformers + peft directly, so
# fedsim itself is not installed there.
#
#   bash benchmarks/flower_env.sh            # once (a few minutes)
#   benchmarks/.flower-venv/bin/python benchmarks/flower_bench.py --clients 8 --rounds 3
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.flower-venv"
python="${PYTHON:-python3}"
# torch 2.13.0 as in fedsim's own set-up; on a CPU-only machine pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
extra=()
if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi
"$venv/bin/python" -m pip install "${extra[@]}" "$torch_spec" "flwr[simulation]==1.41.0" \
  transformers peft pyarrow pandas
"$venv/bin/python" - <<'EOF'
import flwr, ray, torch, transformers, peft
print(f"flower env ready: flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF
