"""Harvest throughput: early exit after layer L vs a full forward, fp32 and bf16 model.

    python benchmarks/harvest.py [--model smollm2-135m] [--layer 15] [--batch 32] [--repeats 3]

Prints tokens/s for each setting and the early-exit speed-up, all measured in this run on the same
token blocks of the built-in corpus.
"""

import argparse
import json
import time

import torch

from mxd.data import DataConfig, load_blocks
from mxd.models import find_mlp, load_model, mlp_activations


def tokens_per_s(model, blocks, site, early_exit, repeats):
    mlp_activations(model, blocks, [site], early_exit)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mlp_activations(model, blocks, [site], early_exit)
        best = min(best, time.perf_counter() - start)
    return blocks.numel() / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32, help="sequences of 128 tokens per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results = {"threads": torch.get_num_threads(), "layer": args.layer, "batch_tokens": args.batch * 128}
    print(f"{args.model}, layer {args.layer}, {args.batch} x 128 tokens per forward, {torch.get_num_threads()} threads")
    print(f"{'dtype':6} {'full tok/s':>11} {'early tok/s':>12} {'speed-up':>9}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tokenizer = load_model(args.model, dtype=dtype)
        blocks = load_blocks(DataConfig(), tokenizer, "train", max_tokens=args.batch * 128)
        site = find_mlp(model, args.layer)
        full = tokens_per_s(model, blocks, site, False, args.repeats)
        early = tokens_per_s(model, blocks, site, True, args.repeats)
        results[name] = {"full_tokens_per_s": full, "early_exit_tokens_per_s": early, "speedup": early / full}
        print(f"{name:6} {full:11.0f} {early:12.0f} {early / full:8.2f}x")
    print(f"bf16 / fp32 with early exit: {results['bf16']['early_exit_tokens_per_s'] / results['fp32']['early_exit_tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
