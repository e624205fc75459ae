#!/usr/bin/env bash
# Fifth round: bounded balancing (only experts chosen on more than a cap of the tokens are pushed down,
# dead ones up) instead of balancing toward equal load. Same budget and settings as screen.sh.
source experiments/always-on/lib.sh
c0=(--aux-k 0 --shared-modulator --coefficients signed)
run c0-signed-cap0.1-bal1e-2-k32   --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.1
run c0-signed-cap0.5-bal1e-2-k32   --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.5
run c0-lin-signed-cap0.1-bal1e-2-k32 --k 32 "${c0[@]}" --balance-rate 1e-2 --balance-cap 0.1 --linear-modulation
