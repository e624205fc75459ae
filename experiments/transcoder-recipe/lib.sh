# Shared by screen*.sh: the frontier budget (2,048,000 training tokens of the frontier cache, K = 32,
# 16 x 576 budget, bf16 autocast, validation on 65,536 tokens) and a resumable `run NAME OPTIONS...`.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/transcoder-recipe}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --expansion 16 --k 32
        --train-tokens 2048000 --autocast bf16 --eval-every 250 --val-tokens 65536 --checkpoint-every 500)
run() {
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
