#!/usr/bin/env bash
# The exact commands behind experiments/smollm2-frontier (run from the repository root, after make install).
set -euo pipefail
source .venv/bin/activate
# 1. activations of SmolLM2-135M-Instruct layer 15 (bf16 model, bf16 storage): train split, then held-out documents
python -m mxd harvest --out cache/smollm2-L15-train --layers 15 --split train --max-tokens 1228800 --dtype bf16 --model-dtype bf16
python -m mxd harvest --out cache/smollm2-L15-val --layers 15 --split validation --max-tokens 65536 --dtype bf16 --model-dtype bf16
# 2. the grid: 3 methods x K in {16, 32, 64, 128}, parameter-matched, trained then evaluated together (resumable)
python -m mxd sweep --config experiments/smollm2-frontier/sweep.yaml
# 3. figures and report
python -m mxd report runs/smollm2-frontier --out experiments/smollm2-frontier --title "MxD vs transcoders on SmolLM2-135M-Instruct, layer 15"
cp runs/smollm2-frontier/frontier.json runs/smollm2-frontier/sweep.json experiments/smollm2-frontier/
