#!/usr/bin/env bash
# Second screening round: every chosen expert contributes (signed coefficients), with a shared modulator c0,
# selection-bias balancing and/or a dense linear modulation W_m x. Same budget and settings as screen.sh.
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
run c0-signed-bal1e-3-k32     --k 32 --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3
run c0-signed-k32             --k 32 --aux-k 0 --shared-modulator --coefficients signed
run c0-signed-bal1e-2-k32     --k 32 --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-2
run c0-lin-k32                --k 32 --aux-k 0 --shared-modulator --linear-modulation
run c0-lin-signed-bal1e-3-k32 --k 32 --aux-k 0 --shared-modulator --linear-modulation --coefficients signed --balance-rate 1e-3
