#!/usr/bin/env bash
# Second screening round: every chosen expert contributes (signed coefficients), with a shared modulator c0,
# selection-bias balancing and/or a dense linear modulation W_m x. Same budget and settings as screen.sh.
source experiments/always-on/lib.sh
run c0-signed-bal1e-3-k32     --k 32 --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3
run c0-signed-k32             --k 32 --aux-k 0 --shared-modulator --coefficients signed
run c0-signed-bal1e-2-k32     --k 32 --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-2
run c0-lin-k32                --k 32 --aux-k 0 --shared-modulator --linear-modulation
run c0-lin-signed-bal1e-3-k32 --k 32 --aux-k 0 --shared-modulator --linear-modulation --coefficients signed --balance-rate 1e-3
