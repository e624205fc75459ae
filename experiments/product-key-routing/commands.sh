#!/usr/bin/env bash
# Product-key vs flat MxD router on SmolLM2-135M-Instruct layer 15 (GitHub issue 9): the frontier
# experiment's layer, caches and budget (experiments/smollm2-frontier/commands.sh, step 1), K = 32,
# N = 65,536. The exact commands behind this folder, run from the repository root after make install.
set -euo pipefail
source .venv/bin/activate
# 0. the frontier experiment's caches (skip if they exist)
python -m mxd harvest --out cache/smollm2-L15-train --layers 15 --split train --max-tokens 1228800 --dtype bf16 --model-dtype bf16
python -m mxd harvest --out cache/smollm2-L15-val --layers 15 --split validation --max-tokens 65536 --dtype bf16 --model-dtype bf16
common=(--cache cache/smollm2-L15-train --val-cache cache/smollm2-L15-val --kind mxd --k 32 --n-experts 65536
        --train-tokens 2048000 --batch-tokens 1024 --autocast bf16 --lr 0.001 --warmup-steps 100
        --eval-every 250 --val-tokens 65536 --checkpoint-every 250)
# 1. product-key and flat router, one after the other (an interrupted run continues with the same command plus --resume)
python -m mxd train "${common[@]}" --router product_key --out runs/product-key/pk-n65536-k32
python -m mxd train "${common[@]}" --router flat --out runs/product-key/flat-n65536-k32
# 2. product-key with the Switch-style load-balancing loss at two weights, side by side, one core each
OMP_NUM_THREADS=1 python -m mxd train "${common[@]}" --router product_key --balance-coef 0.001 --out runs/product-key/pk-balance0.001-n65536-k32 &
OMP_NUM_THREADS=1 python -m mxd train "${common[@]}" --router product_key --balance-coef 0.01 --out runs/product-key/pk-balance0.01-n65536-k32 &
wait
# 3. evaluation on 65,536 held-out tokens (validation documents), the report, and the router benchmark at this N
python -m mxd eval runs/product-key --eval-tokens 65536 --eval-batch-size 16 --out experiments/product-key-routing
python -m mxd report runs/product-key --out experiments/product-key-routing --title "Product-key vs flat MxD router, SmolLM2-135M layer 15, K = 32, N = 65,536"
python benchmarks/routing.py --n-experts 65536 --reps 3 --json experiments/product-key-routing/routing-benchmark.json
