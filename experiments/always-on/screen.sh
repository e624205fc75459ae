#!/usr/bin/env bash
# Screening of MxD variants against always-on experts (issue: an honest frontier, part 3).
# SmolLM2-135M-Instruct layer 15, the frontier caches (commands in experiments/smollm2-frontier/commands.sh),
# 512k training tokens, K = 32 unless named, batch 1,024, Adam 1e-3, bf16 autocast; metrics on 65,536
# validation tokens. Each run: `mxd train`; the table: summarise.py. Rerunning skips finished runs.
source experiments/always-on/lib.sh
run paper-k32            --k 32 --aux-k 0 --no-data-init
run paper-aux-k32        --k 32
run c0-k32               --k 32 --aux-k 0 --shared-modulator
run bal1e-3-k32          --k 32 --aux-k 0 --balance-rate 1e-3
run c0-bal1e-3-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-3
run c0-bal1e-2-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-2
run c0-bal1e-4-k32       --k 32 --aux-k 0 --shared-modulator --balance-rate 1e-4
run c0-bal1e-3-aux-k32   --k 32 --shared-modulator --balance-rate 1e-3
run dense-only           --k 0
