#!/usr/bin/env bash
# Transcoder recipes at the frontier budget (issue: an honest frontier, part 2): TopK transcoder of width
# 9,216 (16 x 576), K = 32, SmolLM2-135M-Instruct layer 15, 2,048,000 training tokens of the frontier cache,
# bf16 autocast; validation on 65,536 held-out tokens. Rerunning skips finished runs.
source experiments/transcoder-recipe/lib.sh
run old-adam1e-3-b1024        --kind transcoder --optimizer adam --batch-tokens 1024 --decoder-init uniform --no-data-init --aux-k 0 --lr 1e-3
run new-adam-b1024 --kind transcoder --optimizer adam --batch-tokens 1024
run new-adam1e-3-b1024 --kind transcoder --optimizer adam --batch-tokens 1024 --lr 1e-3
run new-signum-b4096 --kind transcoder          --batch-tokens 4096 --optimizer signum --decay constant --warmup-steps 0
run new-signum-noaux-b4096 --kind transcoder    --batch-tokens 4096 --optimizer signum --decay constant --warmup-steps 0 --aux-k 0
run new-adam1e-3-b4096 --kind transcoder --optimizer adam --batch-tokens 4096 --lr 1e-3 --warmup-steps 25
