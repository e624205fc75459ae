# Shared by screen*.sh: the screening budget and a resumable `run NAME OPTIONS...` (one mxd train each).
# SmolLM2-135M-Instruct layer 15, the frontier caches (experiments/smollm2-frontier/commands.sh, step 1),
# 512k training tokens, batch 1,024, Adam at $LR (default 1e-3), bf16 autocast; validation on 65,536 tokens.
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-runs/always-on}
common=(--cache cache/frontier-L15-train --val-cache cache/frontier-L15-val --kind mxd --variant paper --expansion 16
        --train-tokens 512000 --batch-tokens 1024 --autocast bf16 --lr "${LR:-1e-3}" --eval-every 250 --val-tokens 65536
        --checkpoint-every 500)
run() {
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return
  python -m mxd train "${common[@]}" --out "$OUT/$name" "$@" $( [ -f "$OUT/$name/config.json" ] && echo --resume )
}
