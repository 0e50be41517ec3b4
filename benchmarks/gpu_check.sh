#!/usr/bin/env bash
# One prepared check on a GPU machine: the CUDA test module, then the benchmark's GPU rows.
#   bash benchmarks/gpu_check.sh            (from the repository root; writes gpu_check.log here or under $OUT)
# Prints the card, the tests' result, the time per collection as a share of a TopK step at F = 131,072 and
# 1,048,576, the floor rows at F = 131,072 on the GPU, and the host syncs counted by torch.cuda.set_sync_debug_mode.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${OUT:-.}/gpu_check.log
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== tests/test_cuda.py"
  $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -15
  echo "== GPU rows"
  $PY benchmarks/collection.py --device cuda --gpu-rows 131072 1048576 --tokens 4096 --k 32 --floor-collections 6
  echo "== floor rows on the GPU"
  $PY benchmarks/collection.py --device cuda --floor 131072 --floor-tokens 4096 --no-dense
  echo "load average: $(cat /proc/loadavg)"
} 2>&1 | tee "$LOG"
