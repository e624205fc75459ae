#!/usr/bin/env bash
# The peer comparison, run from the repository root after make install and the frontier's harvest and
# learning-rate grid (experiments/smollm2-frontier/commands.sh, steps 1 and 2): EleutherAI sparsify's
# transcoder trained by its own trainer, then evaluated with mxd's three K = 32 transcoders of the grid
# on the same 65,536 test-split tokens (documents that neither training nor selection saw).
set -euo pipefail
source .venv/bin/activate
python experiments/peer-sparsify/train_sparsify.py --out runs/peer-sparsify --tokens 2048000 --k 32
python -m mxd eval runs/peer-sparsify/sparsify-k32/layers.15.mlp runs/smollm2-frontier/lr-grid/transcoder-k32-lrx*-seed0 \
    --model smollm2-135m --eval-split test --eval-tokens 65536 --eval-batch-size 16 --out experiments/peer-sparsify/eval
