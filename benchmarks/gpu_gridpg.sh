#!/usr/bin/env bash
# The grid pointing game protocol of RESULTS.md §G at the size on a GPU, one setup per device call
# (<= 10 minutes each; a run cut by its timeout keeps its finished runs, and the next call resumes them):
#
#     SETUP=clothing bash benchmarks/gpu_gridpg.sh        # carry: models/efficientnet_lite0/timm data/clothing-small-128
#     SETUP=tiny-imagenet bash benchmarks/gpu_gridpg.sh   # carry: models/efficientnet_lite0/timm data/tiny-imagenet-10
#
# Needs (ignored folders, under 64 MiB together for one setup):
#   models/efficientnet_lite0/timm   python -m sd_plugin convert-efficientnet-lite0 models/efficientnet_lite0
#   data/clothing-small-128          python benchmarks/natural_images.py clothing --output data/clothing-small-128 \
#                                        --max-side 128 --quality 85
#   data/tiny-imagenet-10            python benchmarks/natural_images.py tiny-imagenet --output data/tiny-imagenet-10 \
#                                        --classes 10
# Uses the machine's torch / transformers / timm with PYTHONPATH=. (nothing is installed). Writes to $OUT
# (else benchmarks/results/gpu-gridpg-$SETUP); copy results.json back into the CPU folder to merge seeds.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
setup="${SETUP:-clothing}"
case "$setup" in
  clothing) data="${DATA:-data/clothing-small-128}" size="${IMAGE_SIZE:-128}" ;;
  tiny-imagenet) data="${DATA:-data/tiny-imagenet-10}" size="${IMAGE_SIZE:-96}" ;;
  *) echo "SETUP must be clothing or tiny-imagenet" >&2; exit 2 ;;
esac
out="${OUT:-benchmarks/results/gpu-gridpg-$setup}"
mkdir -p "$out"
python -c "import torch, timm, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'timm', timm.__version__, 'transformers', transformers.__version__)" | tee "$out/machine.txt"
timeout 560 python benchmarks/gridpg_finetune.py --data "$data" --image-size "$size" --epochs "${EPOCHS:-5}" \
    --seeds 0 1 2 --runs baseline sgt saliencydecor control adv:0.008 adv:0.031 adv:0.063 --grids 200 \
    --disconnected --output-dir "$out" >"$out/gridpg.log" 2>&1
echo "gridpg exit $?" >>"$out/gridpg.log"
grep "seed" "$out/gridpg.log" | grep -v "^{" | tail -n 25
head -n 40 "$out/RESULTS.md"
