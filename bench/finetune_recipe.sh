#!/bin/bash
# Fine-tune recipe variants (issue 23 item 3) on the encoders of a finished demo run: demo-cls, fine-tune only,
# MIM-only and ECAMP rows, into a scratch run directory (the finished run is only read).
#   bench/finetune_recipe.sh RUN_DIR OUT_DIR [--set evaluate.protocol.finetune.lr=... ...]
# e.g. bench/finetune_recipe.sh runs/demo /tmp/ft_lpft --set 'evaluate.fractions=[10, 100]' \
#        --set 'evaluate.seeds=[0]' --set evaluate.protocol.finetune_head=linear_probe
# Results: bench/RESULTS.md "evaluate" -> "The fine-tune recipe".
set -euo pipefail
RUN=$1 OUT=$2
shift 2
for stage in pretrain_ecamp pretrain_ecamp__mim_only; do
  mkdir -p "$OUT/$stage"
  cp "$RUN/$stage/encoder.safetensors" "$RUN/$stage/_stage.json" "$OUT/$stage/"
done
.venv/bin/ecamp evaluate -c configs/demo.yaml --run-dir "$OUT" \
  --set 'evaluate.inits=[mim_only, ecamp]' --set 'evaluate.protocols=[finetune]' \
  --set 'evaluate.datasets=[{name: demo-cls, kind: synth, task: classification, path: demo_data/downstream}]' "$@"
.venv/bin/ecamp report --run-dir "$OUT"
