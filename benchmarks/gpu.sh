#!/usr/bin/env bash
# Every GPU-specific check and timing in one call, for a session lent a CUDA device:
#   bash benchmarks/gpu.sh [OUT_DIR]
# Runs, on the GPU: the optimizer benchmark (ZSharp vs SAM step with bf16 autocast and
# channels-last, the filter vs torch.quantile, peak memory, a host-sync check), the data
# path benchmark (device-resident loader vs DataLoader workers), the CUDA tests, and one
# short training run per model family with and without torch.compile.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python benchmarks/optim_step.py --device cuda --out "$OUT/optim_step.json" 2>&1 | tee "$OUT/optim_step.log"
python benchmarks/data_path.py --device cuda --out "$OUT/data_path.json" 2>&1 | tee "$OUT/data_path.log"
python -m pytest -q tests/test_data.py -k cuda 2>&1 | tee "$OUT/tests.log"
for model in resnet56 vit; do
  for compile in "" "--compile"; do
    zsharp train --dataset digits --model "$model" --optimizer zsharp --epochs 2 \
      --out "$OUT/train-$model${compile:+-compiled}" --progress lines $compile 2>&1 \
      | tail -3 | tee -a "$OUT/train.log"
  done
done
