#!/usr/bin/env bash
# Pruning ablation on the demo task (docs/benchmarks.md): train a small and a large model on the full
# training split, prune it to half with DeltaLoss and at random, train the large model's architecture on
# each half from scratch, and evaluate both on the held-out split.
#
#   bash scripts/prune_ablation.sh [OUT_DIR]
#   TRAIN=20000 STEPS=800 bash scripts/prune_ablation.sh    # the demo recipe's own size and steps
#
# MODEL and SMALL are extra `nvila fit` arguments for the large and the small model; IMAGE the image size.
set -euo pipefail
OUT=${1:-prune-ablation}
TRAIN=${TRAIN:-20000}
STEPS=${STEPS:-800}
IMAGE=${IMAGE:-64}
read -r -a MODEL <<< "${MODEL:-}"
read -r -a SMALL <<< "${SMALL:---model.llm.hidden_size=64 --model.llm.intermediate_size=128 --model.llm.num_layers=1}"
COMMON=(--config demo --data.val=null --trainer.enable_progress_bar=false --trainer.max_time=null)

nvila data synth --out "$OUT/data" --train "$TRAIN" --val 500 --image-size "$IMAGE"
ckpt() { find "$1" -type d -name checkpoint | head -1; }

# the scorers: the large model, and a narrower, shallower one trained half as long, on the full split
nvila fit "${COMMON[@]}" "${MODEL[@]}" --data.train="$OUT/data/train" --trainer.default_root_dir="$OUT/runs/large" \
  --trainer.max_steps="$STEPS"
nvila fit "${COMMON[@]}" "${MODEL[@]}" "${SMALL[@]}" --data.train="$OUT/data/train" \
  --trainer.default_root_dir="$OUT/runs/small" --trainer.max_steps="$((STEPS / 2))"
echo "held-out accuracy of the scorers (large, small):"
nvila eval --ckpt "$(ckpt "$OUT/runs/large")" --shards "$OUT/data/val"
nvila eval --ckpt "$(ckpt "$OUT/runs/small")" --shards "$OUT/data/val"

nvila prune --pruner deltaloss --keep 0.5 --in "$OUT/data/train" --out "$OUT/pruned-deltaloss" \
  --small-ckpt "$(ckpt "$OUT/runs/small")" --large-ckpt "$(ckpt "$OUT/runs/large")" --batch-size 64
nvila prune --pruner random --keep 0.5 --in "$OUT/data/train" --out "$OUT/pruned-random"

for kind in deltaloss random; do
  nvila fit "${COMMON[@]}" "${MODEL[@]}" --data.train="$OUT/pruned-$kind" \
    --trainer.default_root_dir="$OUT/runs/half-$kind" --trainer.max_steps="$STEPS"
  echo "held-out accuracy, trained on the $kind half:"
  nvila eval --ckpt "$(ckpt "$OUT/runs/half-$kind")" --shards "$OUT/data/val"
done
