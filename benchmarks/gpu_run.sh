#!/usr/bin/env bash
# The GPU measurements, prepared to run as one command on a machine with a CUDA GPU:
#   bash benchmarks/gpu_run.sh [OUT]        (OUT: where logs and tables go; default results/gpu_run)
# 1. the GPU and its fp32 matrix-multiply rate (TF32 off), measured here;
# 2. the device tests (the fake-device guard, and the real-GPU comparison they skip without one);
# 3. the tiny workflow with device cpu and device cuda: every TSV equal within 1e-4 relative;
# 4. the paper-size stand-in (configs/paper-scale-random.yaml) end to end, one GPU, one job at a
#    time, its wall time and every rule's time from the benchmark files.
# Without a GPU, steps 1 and 3-4 say so and stop; step 2 runs (the CPU-possible part).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_run}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
CORES=$(nproc)
status=0
step() { echo; echo "== $*"; }

step "GPU and fp32 matmul rate"
nvidia-smi 2>&1 | head -15 | tee "$OUT/nvidia-smi.txt"
$PY benchmarks/gpu_matmul.py 2>&1 | tee "$OUT/matmul.txt"

step "device tests"
$PY -m pytest -q tests/test_devices.py 2>&1 | tail -5 | tee "$OUT/device_tests.txt" || status=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible: the tiny cpu/cuda comparison and the paper-size run need one"
    exit $status
fi

step "tiny workflow: cpu vs cuda"
$PY benchmarks/compare_runs.py --devices cpu cuda --cores "$CORES" --keep "$OUT/tiny" 2>&1 \
    | tee "$OUT/tiny_compare.txt" || status=1

step "paper-size stand-in, one GPU, sequential"
start=$(date +%s)
# one job at a time (every job takes the one "gpu" slot), each torch rule with all the cores
threads=""
for rule in cache_activations train_lens ridge_lens eval_lens svd h0_layer h1_layer h1_heads h2_layer \
    shuffle_pairs shuffle_windows; do threads="$threads $rule=$CORES"; done
# shellcheck disable=SC2086
$PY -m snakemake --configfile configs/paper-scale-random.yaml --directory "$OUT/paper" \
    --cores "$CORES" --default-resources gpu=1 --resources gpu=1 --set-threads $threads \
    --config device=cuda > "$OUT/paper_snakemake.log" 2>&1 || status=1
echo "wall: $(( $(date +%s) - start )) s (target: 900 s on one H100)" | tee "$OUT/paper_wall.txt"
$PY - "$OUT/paper/results" <<'PYEOF' | tee "$OUT/paper_rules.txt"
import sys
from lensspace.provenance import benchmark_jobs, per_rule
table = per_rule(benchmark_jobs(sys.argv[1]))
print(table.to_string(index=False))
print(f"sum of job times: {table['total_s'].sum():.0f} s")
PYEOF
exit $status
