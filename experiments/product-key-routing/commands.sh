#!/usr/bin/env bash
# Product-key vs flat MxD router on SmolLM2-135M-Instruct layer 15 (GitHub issue 9): the frontier
# experiment's caches and budget (experiments/smollm2-frontier/commands.sh, step 1), K = 32, N = 65,536.
set -euo pipefail
source .venv/bin/activate
common=(--cache cache/smollm2-L15-train --val-cache cache/smollm2-L15-val --kind mxd --k 32 --n-experts 65536
        --train-tokens 2048000 --batch-tokens 1024 --autocast bf16 --lr 0.001 --warmup-steps 100
        --eval-every 250 --val-tokens 65536 --checkpoint-every 250)
# (an interrupted run continues with the same command plus --resume)
python -m mxd train "${common[@]}" --router flat --out runs/product-key/flat-n65536-k32
python -m mxd train "${common[@]}" --router product_key --out runs/product-key/pk-n65536-k32
python -m mxd eval runs/product-key --eval-tokens 65536 --eval-batch-size 16 --out experiments/product-key-routing
python -m mxd report runs/product-key --out experiments/product-key-routing --title "Product-key vs flat MxD router, SmolLM2-135M layer 15, K = 32, N = 65,536"
python benchmarks/routing.py --json experiments/product-key-routing/routing-benchmark.json
