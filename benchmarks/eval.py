"""`mxd eval` with the shared prefix (blocks before the evaluated layer run once per batch) vs whole-model
forwards, on trained runs, measured in one process on the same tokens.

    python benchmarks/eval.py runs/smollm2-frontier/mxd-k16-seed0 ... [--counts 1 2 12] [--eval-tokens 8192]

For each count n, the first n runs are evaluated twice (EvalConfig.shared_prefix on and off, same
records) and the wall-clock ratio is printed with the tokens/s of each and the FLOP-based ceiling
of the saving: matmul FLOPs of the forwards each way (2 x parameters touched per token; attention
scores and softmaxes left out), counting what `evaluate_runs` runs per batch: pass 1 up to the
deepest layer, then the base, one forward per run, zero and mean ablation, and three ablations per
MxD run with experts.
"""

import argparse
import json
import time

import torch

from mxd.evaluate import EvalConfig, evaluate_runs
from mxd.layers import MxD
from mxd.models import decoder_layers, load_model
from mxd.runs import read_run


def flop_ceiling(model, runs, layer: int) -> float:
    """(FLOPs of whole-model forwards) / (FLOPs with blocks 0..layer-1 run once per batch)."""
    blocks = decoder_layers(model)[1]
    per_block = [2 * sum(p.numel() for p in b.parameters()) for b in blocks]
    head = 2 * model.get_output_embeddings().weight.numel()
    full = sum(per_block) + head
    tail = sum(per_block[layer:]) + head
    pass1 = sum(per_block[: max(r.layer_index for r in runs) + 1])
    forwards = 1 + len(runs) + 2 + 3 * sum(isinstance(r.layer, MxD) and r.layer.n_latents > 0 for r in runs)
    return (pass1 + forwards * full) / (pass1 + full + (forwards - 1) * tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained run folders (of one model and layer)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 12], help="numbers of runs evaluated together")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    runs = [read_run(p) for p in args.runs]
    model, tokenizer = load_model(runs[0].model, dtype=runs[0].torch_dtype)
    layer = min(r.layer_index for r in runs)
    print(f"{runs[0].model} layer {layer}, {args.eval_tokens:,} tokens, {torch.get_num_threads()} threads")
    print(f"{'runs':>4} {'naive s':>8} {'shared s':>9} {'naive tok/s':>12} {'shared tok/s':>13} {'ratio':>6} {'ceiling':>8}")
    results = []
    for n in args.counts:
        subset = runs[:n]
        if len(subset) < n:
            raise SystemExit(f"--counts {n}: only {len(runs)} runs given")
        seconds, records = {}, {}
        for shared in (False, True):
            cfg = EvalConfig(eval_tokens=args.eval_tokens, eval_batch_size=16, eval_split=args.eval_split, shared_prefix=shared)
            start = time.perf_counter()
            records[shared] = evaluate_runs(subset, cfg, model, tokenizer, progress=False)
            seconds[shared] = time.perf_counter() - start
        same = all(abs(a["delta_ce"] - b["delta_ce"]) < 1e-9 and a["nmse"] == b["nmse"]
                   for a, b in zip(records[False], records[True]))
        ceiling = flop_ceiling(model, subset, layer)
        ratio = seconds[False] / seconds[True]
        tokens = records[True][0]["eval_tokens"]
        results.append({"runs": n, "naive_s": seconds[False], "shared_s": seconds[True], "ratio": ratio,
                        "naive_tokens_per_s": tokens / seconds[False], "shared_tokens_per_s": tokens / seconds[True],
                        "flop_ceiling": ceiling, "same_records": same})
        print(f"{n:4} {seconds[False]:8.1f} {seconds[True]:9.1f} {tokens / seconds[False]:12.0f} "
              f"{tokens / seconds[True]:13.0f} {ratio:5.2f}x {ceiling:7.2f}x" + ("" if same else "  RECORDS DIFFER"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": runs[0].model, "layer": layer, "eval_tokens": args.eval_tokens,
                       "threads": torch.get_num_threads(), "runs": [str(r.path) for r in runs], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
