#!/usr/bin/env bash
# Screening of MxD variants against always-on experts (issue: an honest frontier, part 3).
# SmolLM2-135M-Instruct layer 15, the frontier caches (commands in experiments/smollm2-frontier/commands.sh),
# 512k training tokens, K = 32 unless named, batch 1,024, Adam 1e-3, bf16 autocast; metrics on 65,536
# validation tokens. Each run: `mxd train`; the table: summarise.py. Rerunning skips finished runs.
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
run paper-k32            --k 32 --aux-k 0 --no-data-init
run paper-aux-k32        --k 32
run c0-k32               --k 32 --aux-k 0 --shared-modulator
run bal1e-3-k32          --k 32 --aux-k 0 --balance-rate 1e-3
run c0-bal1e-3-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-3
run c0-bal1e-2-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-2
run c0-bal1e-4-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-4
run c0-bal1e-3-aux-k32   --k 32 --shared-modulator --balance-rate 1e-3
run dense-only           --k 0
