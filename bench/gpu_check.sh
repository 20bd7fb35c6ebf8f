#!/usr/bin/env bash
# One-shot GPU check (H100/H200): CUDA tests of the fast paths, then the training and sampling
# benchmarks at the MD4-S shape, each next to its eager reference. About 8 minutes on an H200.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Uses the python3 that has CUDA PyTorch (no virtual environment, nothing downloaded):
# the package is imported from src/. Results: OUT_DIR/{env.txt,tests.log,train.json,train.log,
# sampling.json,sampling.log}; copy the printed tables into bench/RESULTS.md with the card named.
set -uo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py="${PYTHON:-python3}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$out/env.txt"

echo "== CUDA tests of the fast paths (graph replay vs eager, chunked loss vs reference)"
timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_cross_entropy.py 2>&1 | tee "$out/tests.log" | tail -5

echo "== training throughput: MD4-S, batch 8/16/32/64, eager reference vs fast (chunked loss + compile)"
timeout 330 "$py" bench/bench_train.py --device cuda --shapes md4-s --batch-sizes 8,16,32,64 \
  --variants eager,fast --steps 10 --warmup 3 --json "$out/train.json" 2>&1 | tee "$out/train.log" | grep -v Warning

echo "== sampling: MD4-S, 1024 tokens, batch 1 and 32, eager fp32 / eager bf16 / bf16 CUDA graph"
timeout 240 "$py" bench/bench_sampling_step.py --device cuda --shape md4-s --batch-sizes 1,32 \
  --steps 1000 --steps-b32 100 --json "$out/sampling.json" 2>&1 | tee "$out/sampling.log"
echo "== done: results in $out"
