#!/usr/bin/env bash
# The GPU measurements of the performance targets (docs/cost.md) and issues 20 and 29 in one command, sized for one device call (<= 10 minutes):
#
#     bash benchmarks/gpu_session.sh            # writes to $OUT, else benchmarks/results/gpu
#
# Uses the machine's torch / transformers / timm with PYTHONPATH=. (nothing is installed).
# Prints the masking-cost and bf16 tables, then the fp32 step-cost table last; JSON files go next to them.
set -uo pipefail
export PYTHONPATH=.
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
python -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$out/machine.txt"
# the fixed benchmark: plain and variants interleaved in rounds, defaults (check_finite on, Cholesky
# whitening), memory per variant alone, host syncs per variant, whitening methods side by side
timeout 310 python benchmarks/step_cost.py --rounds 8 --output "$out/step_cost_gpu.json" >"$out/step_cost.txt" 2>&1
echo "step_cost exit $?" >>"$out/step_cost.txt"
timeout 110 python benchmarks/step_cost.py --bf16 --rounds 5 --cases ResNet DeiT \
    --variants sgt saliencydecor "sgt (masked pass every 2nd step)" --output "$out/step_cost_gpu_bf16.json" \
    >"$out/step_cost_bf16.txt" 2>&1
echo "step_cost bf16 exit $?" >>"$out/step_cost_bf16.txt"
timeout 100 python benchmarks/masking_curve_cost.py --output "$out/masking_curve_cost_gpu.json" \
    >"$out/masking_curve_cost.txt" 2>&1
echo "masking_curve_cost exit $?" >>"$out/masking_curve_cost.txt"
# ROAD's multigrid imputation on the device against the CPU reference (issue 29's >= 50x target), and a
# ResNet-18 masking curve at 224 px under ROAD against the mean fill
timeout 60 python benchmarks/road_imputation_cost.py --device cuda --sizes 64 224 --images 100 --reference-images 4 \
    --families smooth blurred --curve-sizes 224 --output "$out/road_imputation_gpu.json" >"$out/road_imputation.txt" 2>&1
echo "road_imputation exit $?" >>"$out/road_imputation.txt"
tail -n 11 "$out/road_imputation.txt"
tail -n 12 "$out/masking_curve_cost.txt" "$out/step_cost_bf16.txt"
tail -n 60 "$out/step_cost.txt"
