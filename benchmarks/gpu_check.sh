#!/usr/bin/env bash
# GPU check (tier 3), ready to run on one H100/H200; about 8 minutes at most (each stage has a time limit):
#   1. the GPU tests: pytest -m gpu (tier 3; they skip themselves without CUDA);
#   2. bf16 + torch.compile (inductor) throughput and MFU through the full engine (ThroughputMonitor's numbers)
#      of a ~127M-parameter dense decoder, seq 2048 (target on an H100: MFU >= 45%; the stage fails below it);
#   3. the same for an MoE decoder (12 blocks, 8 experts, top-2).
# Usage: bash benchmarks/gpu_check.sh      (PYTHON=/path/to/python picks the interpreter)
# The Python stages run on a CPU too: python -m benchmarks.bench_overhead throughput --device cpu --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
status=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, remember a failure, keep going
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (limit ${limit} s) =="
  local began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $name: timed out after ${limit} s"
  [ $rc -ne 0 ] && status=1
  echo "-- $name: exit $rc in $(( $(date +%s) - began )) s"
}

echo "== device =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  || exit 1

stage "GPU tests (pytest -m gpu)" 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
stage "dense ~127M, bf16 + compile" 160 "$PY" -m benchmarks.bench_overhead throughput --device cuda \
  --preset 125m --precision bf16 --compile --steps 60 --log-interval 10 --target-mfu 45
stage "MoE 8 experts top-2, bf16 + compile" 140 "$PY" -m benchmarks.bench_overhead throughput --device cuda \
  --preset moe --precision bf16 --compile --steps 40 --log-interval 10

echo
echo "gpu_check: total $(( $(date +%s) - start )) s, exit $status"
exit $status
