#!/usr/bin/env bash
# The GPU measurements of DESIGN.md §6 and issue 20 in one command, sized for one device call (<= 10 minutes):
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
timeout 330 python benchmarks/step_cost.py --rounds 8 --output "$out/step_cost_gpu.json" >"$out/step_cost.txt" 2>&1
echo "step_cost exit $?" >>"$out/step_cost.txt"
timeout 130 python benchmarks/step_cost.py --bf16 --rounds 5 --cases ResNet DeiT \
    --variants sgt saliencydecor "sgt (masked pass every 2nd step)" --output "$out/step_cost_gpu_bf16.json" \
    >"$out/step_cost_bf16.txt" 2>&1
echo "step_cost bf16 exit $?" >>"$out/step_cost_bf16.txt"
timeout 100 python benchmarks/masking_curve_cost.py --output "$out/masking_curve_cost_gpu.json" \
    >"$out/masking_curve_cost.txt" 2>&1
echo "masking_curve_cost exit $?" >>"$out/masking_curve_cost.txt"
tail -n 12 "$out/masking_curve_cost.txt" "$out/step_cost_bf16.txt"
tail -n 60 "$out/step_cost.txt"
