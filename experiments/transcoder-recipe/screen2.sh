#!/usr/bin/env bash
# Batch size for the frontier: signum at batch 1,024, and the default MxD at batches 1,024 and 4,096,
# at the frontier budget (2,048,000 tokens). Same settings as screen.sh otherwise.
source experiments/transcoder-recipe/lib.sh
run new-signum-b1024       --kind transcoder --batch-tokens 1024 --optimizer signum --decay constant --warmup-steps 0
run mxd-default-b1024      --kind mxd --batch-tokens 1024 --lr 3e-3
run mxd-default-b4096      --kind mxd --batch-tokens 4096 --lr 6e-3 --warmup-steps 25
