#!/usr/bin/env bash
# Fourth round: the experts start silent (modulators at zero) so that the layer starts as its dense path,
# a higher learning rate, and K = 128 of the linear-modulation candidate. Same budget and settings as screen.sh.
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
bal=(--aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3)
run c0-signed-bal1e-3-zero-k32      --k 32 "${bal[@]}" --modulator-init zero
run c0-signed-bal1e-3-zero-lr3-k32  --k 32 "${bal[@]}" --modulator-init zero --lr 3e-3
run c0-lin-signed-bal1e-3-zero-k32  --k 32 "${bal[@]}" --modulator-init zero --linear-modulation
run c0-lin-signed-bal1e-3-k128      --k 128 "${bal[@]}" --linear-modulation
run c0-lin-signed-bal1e-3-k16       --k 16 "${bal[@]}" --linear-modulation
