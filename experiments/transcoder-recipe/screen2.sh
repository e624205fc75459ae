#!/usr/bin/env bash
# Batch size for the frontier: signum at batch 1,024, and the default MxD at batches 1,024 and 4,096,
# at the frontier budget (2,048,000 tokens). Same settings as screen.sh otherwise.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/transcoder-recipe}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --expansion 16 --k 32
        --train-tokens 2048000 --autocast bf16 --eval-every 250 --val-tokens 65536 --checkpoint-every 500)
run() {  # run NAME OPTIONS...
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
run new-signum-b1024       --kind transcoder --batch-tokens 1024 --optimizer signum --decay constant --warmup-steps 0
run mxd-default-b1024      --kind mxd --batch-tokens 1024 --lr 3e-3
run mxd-default-b4096      --kind mxd --batch-tokens 4096 --lr 6e-3 --warmup-steps 25
