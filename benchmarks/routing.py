"""Flat vs product-key MxD routers (GitHub issue 9): router FLOPs and tokens/s, inference and training.

The router is what grows with N: a flat router scores all N experts (2·N·d_in FLOPs a token), a
product-key router two sub-routers over n_rows + n_cols ≈ 2√N sub-keys plus candidates² sums.
For each N, at d_in = 576 (SmolLM2-135M), K = 32, 4,096 tokens a batch:
- inference: `router.topk(x, K)` under no_grad;
- training: forward and backward of `router.topk` (gradients of x and of the router weights);
- layer: one training step of the whole MxD (d_out = 576, H = 1536, GLU) with each router, Adam
  included, to show what the router's saving is worth in a layer.
Repetitions of flat and product-key are interleaved and the medians reported; the FLOP counts come
from `flops_per_token` of each router (the formulas above), not from timing.

    python benchmarks/routing.py                                  # N in {16,384; 65,536; 262,144}
    python benchmarks/routing.py --n-experts 65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mxd import MxD, MxDConfig
from mxd.train import reconstruction_loss

D = 576
D_HIDDEN = 1536


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _cases(layer: MxD, x: torch.Tensor, y: torch.Tensor, k: int):
    router = layer.router
    opt = torch.optim.Adam(layer.parameters(), lr=1e-4)
    xg = x.clone().requires_grad_()

    def inference():
        with torch.no_grad():
            router.topk(x, k)

    def training():
        values, _ = router.topk(xg, k)
        values.sum().backward()

    def layer_step():
        opt.zero_grad(set_to_none=True)
        y_hat, _ = layer(x)
        reconstruction_loss(y_hat, y).backward()
        opt.step()

    return {"inference": inference, "training": training, "layer_step": layer_step}


def run(n_experts: int, k: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, D), torch.randn(batch, D)
    layers = {name: MxD(MxDConfig(D, D, D_HIDDEN, n_experts, k, router=name)) for name in ("flat", "product_key")}
    cases = {name: _cases(layer, x, y, k) for name, layer in layers.items()}
    times = {(name, case): [] for name in layers for case in cases[name]}
    for case in ("inference", "training", "layer_step"):
        for name in layers:
            cases[name][case]()  # warm-up
        for _ in range(reps):  # interleaved
            for name in layers:
                times[(name, case)] += _time(cases[name][case], 1)
    result = {"n_experts": n_experts, "k": k, "batch_tokens": batch, "d_in": D, "threads": torch.get_num_threads(),
              "load_avg_1min": os.getloadavg()[0]}
    for name, layer in layers.items():
        result[f"{name}_router_flops_per_token"] = layer.router.flops_per_token(k)
        result[f"{name}_router_params"] = sum(p.numel() for p in layer.router.parameters())
        for case in ("inference", "training", "layer_step"):
            result[f"{name}_{case}_tokens_per_s"] = batch / statistics.median(times[(name, case)])
    result["router_flops_ratio"] = result["flat_router_flops_per_token"] / result["product_key_router_flops_per_token"]
    for case in ("inference", "training", "layer_step"):
        result[f"{case}_speedup"] = result[f"product_key_{case}_tokens_per_s"] / result[f"flat_{case}_tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-experts", type=int, nargs="+", default=[16_384, 65_536, 262_144])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [run(n, args.k, args.batch, args.reps) for n in args.n_experts]
    print(f"{'N':>8} {'router FLOPs/tok flat':>22} {'product-key':>12} {'ratio':>7} | tokens/s flat → product-key "
          f"(speed-up): inference, router training, MxD layer step")
    for r in results:
        cells = "  ".join(f"{r[f'flat_{c}_tokens_per_s']:,.0f} → {r[f'product_key_{c}_tokens_per_s']:,.0f} ({r[f'{c}_speedup']:.1f}×)"
                          for c in ("inference", "training", "layer_step"))
        print(f"{r['n_experts']:8,} {r['flat_router_flops_per_token']:22,} {r['product_key_router_flops_per_token']:12,} "
              f"{r['router_flops_ratio']:6.0f}× | {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
