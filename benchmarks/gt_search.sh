#!/usr/bin/env bash
# The ground-truth search of RESULTS.md §S: which training method makes gradient saliency point at the
# evidence, against the baseline and the random-mask control, 3 paired seeds, ResNet-10t from scratch at 32 px.
# CPU (2 cores): about 40 minutes for 1-2, 60 more for 3-4. Writes benchmarks/results/gt-search-{blocks32,loc32}-cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -d data/blocks32 ] || $PY benchmarks/localization_data.py --output data/blocks32 --layout blocks --train 3000 --test 500 --image-size 32
[ -d data/loc32 ] || $PY benchmarks/localization_data.py --output data/loc32 --train 3000 --test 500 --image-size 32
COMMON=(--model scratch:resnet10t --image-size 32 --epochs 4 --learning-rate 3e-3 --seeds 0 1 2 --metric-images 100 --step 10)
CONTROL=sgt:mask_selection=random
# 1. Block-MNIST-style: the baseline, SGT, the control and one setting of each candidate family
$PY benchmarks/finetune.py --data data/blocks32 "${COMMON[@]}" --methods baseline sgt --variants "$CONTROL" \
    baseline:adversarial_epsilon=0.1 baseline:adversarial_epsilon=0.5,adversarial_norm=l2 \
    baseline:input_gradient_weight=1.0 baseline:explanation_mask_weight=1.0 \
    --output-dir benchmarks/results/gt-search-blocks32-cpu
# 2. Pasted objects on photos: the winner of 1, the control and the baseline
$PY benchmarks/finetune.py --data data/loc32 "${COMMON[@]}" --methods baseline --variants "$CONTROL" \
    baseline:adversarial_epsilon=0.1 \
    --output-dir benchmarks/results/gt-search-loc32-cpu
# 3. Block-MNIST-style, the frontier: smaller l_inf budgets, the decorrelation term on adversarial training,
#    the finite-difference gradient penalty, SGT's mask ratio and saliency target (reuses the runs of 1)
$PY benchmarks/finetune.py --data data/blocks32 "${COMMON[@]}" --methods baseline sgt --variants "$CONTROL" \
    baseline:adversarial_epsilon=0.1 baseline:adversarial_epsilon=0.5,adversarial_norm=l2 \
    baseline:input_gradient_weight=1.0 baseline:explanation_mask_weight=1.0 \
    baseline:adversarial_epsilon=0.01 baseline:adversarial_epsilon=0.02 baseline:adversarial_epsilon=0.03 \
    baseline:adversarial_epsilon=0.05 decor:adversarial_epsilon=0.1 \
    baseline:input_gradient_weight=1.0,input_gradient_mode=finite_difference \
    sgt:mask_ratio=0.5 sgt:saliency_target=logit \
    --reuse benchmarks/results/gt-search-blocks32-cpu --output-dir benchmarks/results/gt-search-blocks32-frontier-cpu
# 4. Pasted objects on photos, the frontier: smaller l_inf budgets and mask supervision (reuses the runs of 2)
$PY benchmarks/finetune.py --data data/loc32 "${COMMON[@]}" --methods baseline --variants "$CONTROL" \
    baseline:adversarial_epsilon=0.1 baseline:adversarial_epsilon=0.005 baseline:adversarial_epsilon=0.01 \
    baseline:adversarial_epsilon=0.02 baseline:adversarial_epsilon=0.03 baseline:explanation_mask_weight=1.0 \
    --reuse benchmarks/results/gt-search-loc32-cpu --output-dir benchmarks/results/gt-search-loc32-frontier-cpu
