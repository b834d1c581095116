#!/usr/bin/env bash
# Pruning ablation on the demo task (docs/benchmarks.md): train a small and a large model on the full
# training split, prune it to half with DeltaLoss and at random, train the demo model on each half, and
# evaluate both on the held-out split. Usage: bash scripts/prune_ablation.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-prune-ablation}
TRAIN=${TRAIN:-6000}
STEPS=${STEPS:-400}
COMMON=(--config demo --data.val=null --trainer.enable_progress_bar=false --trainer.max_time=null)

nvila data synth --out "$OUT/data" --train "$TRAIN" --val 500
ckpt() { find "$1" -type d -name checkpoint | head -1; }

# scorers: the demo model (large) and a narrower, shallower one (small), trained on the full split
nvila fit "${COMMON[@]}" --data.train="$OUT/data/train" --trainer.default_root_dir="$OUT/runs/large" \
  --trainer.max_steps="$STEPS"
nvila fit "${COMMON[@]}" --data.train="$OUT/data/train" --trainer.default_root_dir="$OUT/runs/small" \
  --trainer.max_steps="$((STEPS / 2))" --model.llm.hidden_size=64 --model.llm.intermediate_size=128 \
  --model.llm.num_layers=1 --model.llm.num_heads=2 --model.llm.num_kv_heads=1

nvila prune --pruner deltaloss --keep 0.5 --in "$OUT/data/train" --out "$OUT/pruned-deltaloss" \
  --small-ckpt "$(ckpt "$OUT/runs/small")" --large-ckpt "$(ckpt "$OUT/runs/large")" --batch-size 64
nvila prune --pruner random --keep 0.5 --in "$OUT/data/train" --out "$OUT/pruned-random"

for kind in deltaloss random; do
  nvila fit "${COMMON[@]}" --data.train="$OUT/pruned-$kind" --trainer.default_root_dir="$OUT/runs/half-$kind" \
    --trainer.max_steps="$STEPS"
  echo "held-out accuracy, trained on the $kind half:"
  nvila eval --ckpt "$(ckpt "$OUT/runs/half-$kind")" --shards "$OUT/data/val"
done
