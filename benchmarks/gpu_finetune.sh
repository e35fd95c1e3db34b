#!/usr/bin/env bash
# Pretrained fine-tuning at full size on a GPU, then the step-cost table, in one device call (~9 minutes):
#
#     bash benchmarks/gpu_finetune.sh     # writes to $OUT, else benchmarks/results/gpu-finetune
#
# Needs (ignored folders, carried to the device machine):
#   models/efficientnet_lite0/timm   python -m sd_plugin convert-efficientnet-lite0 models/efficientnet_lite0
#   data/clothing-small-224          python benchmarks/natural_images.py clothing --output data/clothing-small-224 \
#                                        --max-side 224 --quality 70
# Uses the machine's torch / transformers / timm with PYTHONPATH=. (nothing is installed). Seeds are
# trained one at a time across the four methods and the random-mask control (FINETUNE_ARGS, default
# `--variants sgt:mask_selection=random`), so a run cut by FINETUNE_SECONDS has whole seeds.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results/gpu-finetune}"
mkdir -p "$out"
python -c "import torch, timm, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'timm', timm.__version__, 'transformers', transformers.__version__)" | tee "$out/machine.txt"
timeout "${FINETUNE_TIMEOUT:-420}" python benchmarks/finetune.py --data "${DATA:-data/clothing-small-224}" --image-size "${IMAGE_SIZE:-224}" \
    --epochs "${EPOCHS:-8}" --seeds 0 1 2 --metric-images 372 --max-seconds "${FINETUNE_SECONDS:-330}" \
    --output-dir "$out" ${FINETUNE_ARGS:---variants sgt:mask_selection=random} >"$out/finetune.log" 2>&1
echo "finetune exit $?" >>"$out/finetune.log"
timeout "${STEP_COST_TIMEOUT:-120}" python benchmarks/step_cost.py ${STEP_COST_ARGS:-} --output "$out/step_cost_gpu.json" \
    >"$out/step_cost.txt" 2>&1
echo "step_cost exit $?" >>"$out/step_cost.txt"
grep -v "^{" "$out/finetune.log" | tail -n 25
tail -n 25 "$out/step_cost.txt"
