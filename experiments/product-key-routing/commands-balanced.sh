#!/usr/bin/env bash
# The product-key router with the fix that works for the flat router (balanced selection, signed
# coefficients, dense modulation c0 + W_m x: the default MxD variant), against its paper form, on the
# frontier's caches (experiments/smollm2-frontier/commands.sh, step 1): K = 32, N = 65,536 (256 x 256),
# 2,048,000 training tokens, MxD's default recipe (Adam 3e-3, batch 1,024, bf16). Evaluated on the
# frontier's 65,536 test tokens.
set -euo pipefail
source .venv/bin/activate
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --kind mxd --k 32 --n-experts 65536
        --router product_key --train-tokens 2048000 --autocast bf16 --eval-every 500 --val-tokens 65536
        --checkpoint-every 500)
for variant in paper balanced; do
  out=runs/product-key-v2/pk-$variant-n65536-k32
  [ -f $out/final/model.safetensors ] || python -m mxd train "${common[@]}" --variant $variant --out $out \
      $( [ -f $out/config.json ] && echo --resume )
done
python -m mxd eval runs/product-key-v2 --eval-split test --eval-tokens 65536 --eval-batch-size 16 \
    --out experiments/product-key-routing/balanced
