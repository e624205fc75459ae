#!/usr/bin/env bash
# Fourth round: the experts start silent (modulators at zero) so that the layer starts as its dense path,
# a higher learning rate, and K = 128 of the linear-modulation candidate. Same budget and settings as screen.sh.
source experiments/always-on/lib.sh
bal=(--aux-k 0 --shared-modulator --coefficients signed --balance-rate 1e-3)
run c0-signed-bal1e-3-zero-k32      --k 32 "${bal[@]}" --modulator-init zero
run c0-signed-bal1e-3-zero-lr3-k32  --k 32 "${bal[@]}" --modulator-init zero --lr 3e-3
run c0-lin-signed-bal1e-3-zero-k32  --k 32 "${bal[@]}" --modulator-init zero --linear-modulation
run c0-lin-signed-bal1e-3-k128      --k 128 "${bal[@]}" --linear-modulation
run c0-lin-signed-bal1e-3-k16       --k 16 "${bal[@]}" --linear-modulation
