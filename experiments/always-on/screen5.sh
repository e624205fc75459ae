#!/usr/bin/env bash
# Fifth round: bounded balancing (only experts chosen on more than a cap of the tokens are pushed down,
# dead ones up) instead of balancing toward equal load. Same budget and settings as screen.sh.
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
c0=(--aux-k 0 --shared-modulator --coefficients signed)
run c0-signed-cap0.1-bal1e-2-k32   --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.1
run c0-signed-cap0.5-bal1e-2-k32   --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.5
run c0-lin-signed-cap0.1-bal1e-2-k32 --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.1 --linear-modulation
