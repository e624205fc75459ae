#!/usr/bin/env bash
# The exact commands behind experiments/smollm2-frontier (run from the repository root, after make install).
# Rerunning resumes: finished harvests, cells and evaluations are kept.
set -euo pipefail
source .venv/bin/activate
# 1. activations of SmolLM2-135M-Instruct layer 15 (bf16 model, bf16 storage); 10% of documents held out for
#    validation and 10% for test (test text is read by mxd eval, it needs no cache)
python -m mxd harvest --out cache/frontier-L15-train --layers 15 --split train --max-tokens 2048000 --dtype bf16 --model-dtype bf16 --test-fraction 0.1
python -m mxd harvest --out cache/frontier-L15-val --layers 15 --split validation --max-tokens 65536 --dtype bf16 --model-dtype bf16 --test-fraction 0.1
# 2. the grid: learning rates chosen at K = 32 on validation, then 4 methods x K in {16, 32, 64, 128} and the
#    dense-only MxD, trained, then evaluated together on the test split. The grid of 2026-12-02 is committed
#    (lr-grid/selection.json); to continue from it without training the grid again, use sweep-selected.yaml
#    in this step and the next instead of sweep.yaml.
python -m mxd sweep --config experiments/smollm2-frontier/sweep.yaml
# 3. the peer: EleutherAI sparsify's own trainer and defaults on the same model, layer, text, width, K and tokens
#    (experiments/peer-sparsify/README.md), then evaluated with the cells on the same test tokens
python experiments/peer-sparsify/train_sparsify.py --out runs/peer-sparsify --tokens 2048000 --k 32
python -m mxd sweep --config experiments/smollm2-frontier/sweep.yaml --extra-runs runs/peer-sparsify/sparsify-k32/layers.15.mlp
# 4. figures and report
python -m mxd report runs/smollm2-frontier --out experiments/smollm2-frontier --title "MxD vs transcoders on SmolLM2-135M-Instruct, layer 15"
cp runs/smollm2-frontier/frontier.json runs/smollm2-frontier/frontier.md runs/smollm2-frontier/sweep.json \
   runs/smollm2-frontier/lr-grid/selection.json experiments/smollm2-frontier/
