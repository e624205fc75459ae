#!/usr/bin/env bash
# Third round: K = 16 and 128 of the candidates (does nmse fall with K once the slots are spread?),
# and the dense-only reference (k = 0). Same budget and settings as screen.sh.
source experiments/always-on/lib.sh
run dense-only                --k 0 --aux-k 0
for k in 16 128; do
  run paper-k$k               --k $k --aux-k 0 --no-data-init
  run c0-signed-bal1e-3-k$k   --k $k --aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3
done
