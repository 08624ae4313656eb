#!/usr/bin/env bash
# BlockDrop on Fashion-MNIST, sized for 2 CPU cores: from the shipped ResNet-32 base model, learn a
# policy with the curriculum and finetune policy and ResNet jointly on a subset, profile the result
# beside the full base with test.py, then profile and time the shipped ResNet-110 BlockDrop model.
# Everything it writes goes to cv/demo/ (cleared first); the shipped models are only read.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
OUT=cv/demo
R32=(--model R32_FMNIST --workers 0)
R110=(--model R110_FMNIST --workers 0)
start=$SECONDS
shipped=$(ls cv/finetuned/R110_FMNIST_gamma_*/ckpt_E_*.t7 2>/dev/null | head -n 1 || true)
if [ -z "$shipped" ]; then
    echo "demo.sh: the shipped ResNet-110 BlockDrop model (cv/finetuned/R110_FMNIST_gamma_*/ckpt_E_*.t7) is missing" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/5 curriculum learning of the policy on the shipped ResNet-32 base (frozen): 20 epochs, 2,560 images"
# Epochs 0 to 19 (--max_epochs counts after the first, as in the original); the agent decides one
# more of the 15 blocks each epoch, all of them from epoch 14.
"$PYTHON" cl_training.py "${R32[@]}" --subset 2560 --batch_size 128 --penalty -0.5 --max_epochs 19 \
    --eval_every 1000 --cv_dir "$OUT/cl/"
cl=$(ls -t "$OUT"/cl/ckpt_E_*.t7 | head -n 1)

echo "== 2/5 joint finetuning of policy and ResNet: 3 epochs (0 to 2), 20,480 images"
"$PYTHON" finetune.py "${R32[@]}" --subset 20480 --max_epochs 2 --penalty -1 --pretrained "$cl" --cv_dir "$OUT/ft/"
ft=$(ls -t "$OUT"/ft/ckpt_E_*.t7 | head -n 1)

echo "== 3/5 test.py on the 10,000 test images: the full ResNet-32 base, then the model just trained"
"$PYTHON" test.py "${R32[@]}" | tee "$OUT/R32_base.txt"
"$PYTHON" test.py "${R32[@]}" --load "$ft" | tee "$OUT/R32_blockdrop.txt"

echo "== 4/5 test.py: the shipped ResNet-110 BlockDrop model ($shipped)"
"$PYTHON" test.py "${R110[@]}" --load "$shipped" | tee "$OUT/R110_blockdrop.txt"

echo "== 5/5 benchmark.py: the shipped ResNet-110, full network against its BlockDrop policies, wall clock"
"$PYTHON" benchmark.py "${R110[@]}" --load "$shipped" --batch_sizes 1 256 --repeats 3 --json > "$OUT/R110_benchmark.json"

echo "== done in $((SECONDS - start)) s; what the figures show:"
"$PYTHON" - "$OUT" <<'EOF'
import sys

from core.report import demo_summary

print(demo_summary(sys.argv[1]))
EOF
