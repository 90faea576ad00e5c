#!/usr/bin/env bash
# The GPU issue's one prepared device call, once the data is staged (../shared/gpu/README.md, steps 1-2):
#   run  carry [".gpu/tools", ".gpu/data/p6"]  command "bash benchmarks/gpu_call.sh"  timeout_s 590
# 1. S8 for 3 epochs under each lever (cold cache first, so the first row also shows the decoding);
# 2. the three recipes' defaults, S8 first, one fresh process each (benchmarks/timing.py).
# Each table line lands in $OUT at once, so a call cut short still returns what finished. Extra recipe options
# (e.g. "--epochs 1 --subset 20" for a look on the CPU) come from $RECIPE_OPTIONS.
set -uo pipefail
if [ -f .gpu/tools/env.sh ]; then source .gpu/tools/env.sh; fi
export CIFAR_FA_CACHE=${CIFAR_FA_CACHE:-/tmp/cfa/cache} MPLBACKEND=Agg NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-runs/gpu_call} runs=${RUNS:-/tmp/cfa/runs}
mkdir -p "$OUT" "$runs"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU'
  python3 -c 'import torch, fastai; print("torch", torch.__version__, "fastai", fastai.__version__)'
  nproc; } > "$OUT/machine.txt"
# shellcheck disable=SC2086  # RECIPE_OPTIONS and each lever are lists of options
for lever in '' '--no-deterministic' '--workers 8' '--workers 0' '--batch-augs'; do
  python3 benchmarks/timing.py --recipes s8 --out "$runs/lever" -- --epochs 3 $lever ${RECIPE_OPTIONS:-} |
    sed "s/^/[${lever:-defaults}] /" >> "$OUT/levers.txt"
done
python3 benchmarks/timing.py --recipes s8 s7 s9 --out "$runs/defaults" -- ${RECIPE_OPTIONS:-} >> "$OUT/timing.txt"
tar czf "$OUT/defaults.tgz" --exclude=checkpoints --exclude=model.pkl -C "$runs" defaults
cat "$OUT"/machine.txt "$OUT"/levers.txt "$OUT"/timing.txt
