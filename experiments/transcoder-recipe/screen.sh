#!/usr/bin/env bash
# Transcoder recipes at the frontier budget (issue: an honest frontier, part 2): TopK transcoder of width
# 9,216 (16 x 576), K = 32, SmolLM2-135M-Instruct layer 15, 2,048,000 training tokens of the frontier cache,
# bf16 autocast; validation on 65,536 held-out tokens. Rerunning skips finished runs.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/transcoder-recipe}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --kind transcoder --expansion 16 --k 32
        --train-tokens 2048000 --autocast bf16 --eval-every 250 --val-tokens 65536 --checkpoint-every 500)
run() {  # run NAME OPTIONS...
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
run old-adam1e-3-b1024        --batch-tokens 1024 --decoder-init uniform --no-data-init --aux-k 0 --lr 1e-3
run new-adam-b1024            --batch-tokens 1024
run new-adam1e-3-b1024        --batch-tokens 1024 --lr 1e-3
run new-signum-b4096          --batch-tokens 4096 --optimizer signum --decay constant --warmup-steps 0
run new-signum-noaux-b4096    --batch-tokens 4096 --optimizer signum --decay constant --warmup-steps 0 --aux-k 0
run new-adam1e-3-b4096        --batch-tokens 4096 --lr 1e-3 --warmup-steps 25
