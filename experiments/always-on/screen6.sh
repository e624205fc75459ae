#!/usr/bin/env bash
# Sixth round: the same forms at learning rate 3e-3 (the zero-init run showed how much the rate matters),
# dense-only reference included. Same budget and settings as screen.sh otherwise.
LR=3e-3
source experiments/always-on/lib.sh
bal=(--aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-2)
run dense-only-lr3                  --k 0 --aux-k 0
run paper-lr3-k32                   --k 32 --aux-k 0 --no-data-init
run c0-signed-bal1e-2-lr3-k32       --k 32 "${bal[@]}"
run c0-lin-signed-bal1e-2-lr3-k32   --k 32 "${bal[@]}" --linear-modulation
run c0-lr3-k32                      --k 32 --aux-k 0 --shared-modulator
