#!/usr/bin/env bash
# Every GPU-specific check and timing in one call, for a session lent a CUDA device
# (≈ 10 minutes on an H100/H200):
#   bash benchmarks/gpu.sh [OUT_DIR]            # default benchmarks/results/gpu
# Runs, on the GPU: the optimizer benchmark (ZSharp vs SAM step with bf16 autocast and
# channels-last, the filter vs torch.quantile, peak memory, a host-sync check), the data
# path benchmark (device-resident loader vs DataLoader workers, goal ≥ 3×), the CUDA tests
# (data loader, CUDA-graphed step vs eager),
# a short training run with and without torch.compile, the SAM family's step costs, the
# README's quick start (every cell on the GPU), and the throughput of small-model
# cells (one cell and k packed cells per GPU; fp32/TF32/bf16; eager, CUDA graph, compile)
# with the paper grid's projected GPU-hours: OUT_DIR/gpu_throughput.md is the table the
# README shows. $GPU_THROUGHPUT_BUDGET_S bounds that last part (default 390 s).
# A part that fails is reported and the others still run; the exit status is that of the
# first failure. Without a CUDA device it says so and exits 0
# (`python benchmarks/gpu_throughput.py --tiny` checks that code on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu.sh: no CUDA device here: nothing to measure"
  exit 0
fi
status=0
part() {  # part NAME LOG COMMAND...: run one part, its output shown and kept in LOG
  local name=$1 log=$2
  shift 2
  echo "=== $name"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "gpu.sh: $name failed (exit $rc); see $log"
    [ "$status" -ne 0 ] || status=$rc
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
part "optimizer step" "$OUT/optim_step.log" \
  python benchmarks/optim_step.py --device cuda --out "$OUT/optim_step.json"
part "data path" "$OUT/data_path.log" \
  python benchmarks/data_path.py --device cuda --steps 100 --data-steps 300 \
  --out "$OUT/data_path.json"
# tests/test_graphs.py: the captured step equals the eager one (skipped without a GPU)
part "CUDA tests" "$OUT/tests.log" python -m pytest -q tests/test_data.py tests/test_graphs.py -k cuda
for compile in "" "--compile"; do
  part "train resnet20 ${compile:-eager}" "$OUT/train-resnet20${compile:+-compiled}.log" \
    zsharp train --dataset digits --model resnet20 --optimizer zsharp --epochs 2 \
    --out "$OUT/train-resnet20${compile:+-compiled}" --progress lines $compile
done
part "step cost of the SAM family" "$OUT/family_step.log" \
  python benchmarks/family_step.py --device cuda --out "$OUT/family_step.json"
# the README's quick start as a user runs it, every cell on the GPU (device: auto)
part "quick start on CUDA" "$OUT/quickstart.log" bash -c \
  "time snakemake --cores all -q && cp results/quickstart/results.md '$OUT/quickstart-results.md'"
part "throughput of small-model cells" "$OUT/gpu_throughput.log" \
  python benchmarks/gpu_throughput.py --out-dir "$OUT" --data-path-json "$OUT/data_path.json" \
  --budget-s "${GPU_THROUGHPUT_BUDGET_S:-390}"
exit "$status"
