#!/usr/bin/env bash
# The published checkpoint of RESULTS.md §P: ImageNet EfficientNet-Lite0 fine-tuned on Tiny-ImageNet
# (10 classes, 64 px) with METHOD (default sgt; no method is recommended for more faithful saliency,
# RESULTS.md §R "What survives the controls": the card's Limitations say so), evaluated
# beside the baseline and SaliencyDecor trained the same way (seed 0), exported with its card into
# outputs/published/efficientnet_lite0-tiny-imagenet-10-METHOD, the folder that
# `python -m sd_plugin push outputs/published/... --repo-id USER/NAME` uploads.
#
#     bash benchmarks/publish_finetuned.sh [METHOD]      # ~15 minutes on 2 CPU cores
#
# Needs models/efficientnet_lite0 (python -m sd_plugin convert-efficientnet-lite0 models/efficientnet_lite0)
# and data/tiny-imagenet-10 (python benchmarks/natural_images.py tiny-imagenet --output data/tiny-imagenet-10
# --classes 10). Trains with the settings of benchmarks/results/finetune-tiny-imagenet-10-cpu (same seed:
# the same models, so the card's numbers can be checked against that table).
set -euo pipefail
method="${1:-sgt}"
python="${PYTHON:-.venv/bin/python}"
data="${DATA:-data/tiny-imagenet-10}" split="${SPLIT:-validation}" out="${OUTPUTS:-outputs}"
models="$out/finetune-models"
train=(--data "$data" --image-size "${IMAGE_SIZE:-64}" --epochs 1 --seeds 0 --metric-images 200 ${EXTRA:-})
"$python" benchmarks/finetune.py "${train[@]}" --methods baseline sgt saliencydecor \
    --models-dir "$models" --output-dir "$out/finetune-publish"
compare=()
for other in baseline sgt saliencydecor; do
    [[ "$other" == "$method" ]] || compare+=("$models/$other-seed0")
done
"$python" -m sd_plugin evaluate --model "$models/$method-seed0" --compare "${compare[@]}" \
    --dataset "$data" --split "$split" --output-dir "$out/publish-eval" --no-progress
published="$out/published/efficientnet_lite0-$(basename "$data")-$method"
"$python" -m sd_plugin export "$models/$method-seed0" "$published" --overwrite \
    --evaluation "$out/publish-eval/results.json" --dataset tiny-imagenet-200 \
    --training-command "python benchmarks/finetune.py ${train[*]} --methods $method --models-dir $models"
echo "published folder: $published (python -m sd_plugin push $published --repo-id USER/NAME)"
