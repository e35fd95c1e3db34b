#!/usr/bin/env bash
# The GPU measurements of DESIGN.md §6 in one command, sized for one device call (~5 minutes):
#
#     bash benchmarks/gpu_session.sh            # writes to $OUT, else benchmarks/results/gpu
#
# Uses the machine's torch / transformers / timm with PYTHONPATH=. (nothing is installed).
# Prints the step-cost and masking-cost tables last; JSON files go next to them.
set -uo pipefail
export PYTHONPATH=.
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
python -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$out/machine.txt"
timeout 360 python benchmarks/step_cost.py --output "$out/step_cost_gpu.json" >"$out/step_cost.txt" 2>&1
echo "step_cost exit $?" >>"$out/step_cost.txt"
timeout 120 python benchmarks/masking_curve_cost.py --output "$out/masking_curve_cost_gpu.json" \
    >"$out/masking_curve_cost.txt" 2>&1
echo "masking_curve_cost exit $?" >>"$out/masking_curve_cost.txt"
tail -n 30 "$out/step_cost.txt" "$out/masking_curve_cost.txt"
