#!/usr/bin/env bash
# Sixth round: the same forms at learning rate 3e-3 (the zero-init run showed how much the rate matters),
# dense-only reference included. Same budget and settings as screen.sh otherwise.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/always-on}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --kind mxd --variant paper --expansion 16
        --train-tokens 512000 --batch-tokens 1024 --autocast bf16 --lr 3e-3 --eval-every 250 --val-tokens 65536
        --checkpoint-every 500)
run() {  # run NAME OPTIONS...
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
bal=(--aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-2)
run dense-only-lr3                  --k 0 --aux-k 0
run paper-lr3-k32                   --k 32 --aux-k 0 --no-data-init
run c0-signed-bal1e-2-lr3-k32       --k 32 "${bal[@]}"
run c0-lin-signed-bal1e-2-lr3-k32   --k 32 "${bal[@]}" --linear-modulation
run c0-lr3-k32                      --k 32 --aux-k 0 --shared-modulator
