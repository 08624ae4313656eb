#!/usr/bin/env bash
# The BlockDrop pipeline end to end on Fashion-MNIST, sized for 2 CPU cores:
# pretrain a ResNet-20, learn a policy with the curriculum, finetune both jointly, profile.
# It writes the base model to cv/pretrained/R20_FMNIST/ and the rest to cv/demo/ (cleared first).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
MODEL=R20_FMNIST
OUT=cv/demo
FLAGS=(--model "$MODEL" --workers 0)
start=$SECONDS
rm -rf "$OUT"

echo "== 1/4 pretrain the base ResNet-20 (3 epochs on 30k images, stochastic depth 0.2)"
# Written to cv/pretrained/R20_FMNIST/, where the later steps find the newest base model.
# Stochastic depth makes the short-trained base tolerate dropped blocks, as a long-trained one does.
"$PYTHON" pretrain.py "${FLAGS[@]}" --subset 30000 --epochs 3 --drop_rate 0.2

echo "== 2/4 curriculum learning of the policy (ResNet frozen)"
"$PYTHON" cl_training.py "${FLAGS[@]}" --subset 2560 --max_epochs 10 --cv_dir "$OUT/cl/"
cl=$(ls -t "$OUT"/cl/ckpt_E_*.t7 | head -n 1)

echo "== 3/4 joint finetuning of policy and ResNet"
"$PYTHON" finetune.py "${FLAGS[@]}" --subset 5120 --max_epochs 19 --penalty -5 --pretrained "$cl" --cv_dir "$OUT/ft/"
ft=$(ls -t "$OUT"/ft/ckpt_E_*.t7 | head -n 1)

echo "== 4/4 test.py: the full base network, then the finetuned BlockDrop model ($ft)"
"$PYTHON" test.py "${FLAGS[@]}" | sed 's/^/   base ResNet-20  /'
echo "== $((SECONDS - start)) s so far; the finetuned BlockDrop model:"
"$PYTHON" test.py "${FLAGS[@]}" --load "$ft"
