#!/usr/bin/env bash
# Third round: K = 16 and 128 of the candidates (does nmse fall with K once the slots are spread?),
# and the dense-only reference (k = 0). Same budget and settings as screen.sh.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/always-on}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --kind mxd --variant paper --expansion 16
        --train-tokens 512000 --batch-tokens 1024 --autocast bf16 --lr 1e-3 --eval-every 250 --val-tokens 65536
        --checkpoint-every 500)
run() {  # run NAME OPTIONS...
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
run dense-only                --k 0 --aux-k 0
for k in 16 128; do
  run paper-k$k               --k $k --aux-k 0 --no-data-init
  run c0-signed-bal1e-3-k$k   --k $k --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3
done
