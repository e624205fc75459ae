"""End to end: `mxd.train.Trainer` on an activation cache vs the bare layer step (GitHub issue 6).

The bare step is `benchmarks/layers.py`'s (zero_grad, forward, nmse loss, backward, optimiser step)
with a Trainer's own layer and optimiser, on one batch already in memory. The Trainer adds everything `mxd train` does per step: reading and
shuffling batches from the memory-mapped cache (bf16 -> fp32), gradient clipping, the learning-rate
schedule, dead-latent bookkeeping and the logged statistics. Its rate is the steady state between
its metrics records (steps after `--warmup`), with validation and checkpoints pushed past the run.
Bare steps run before and after the Trainer and their median is taken, so that the load of other
processes hits both alike.

    python benchmarks/train.py                      # harvests cache/bench-L15 (~100k tokens) if missing
    python benchmarks/train.py --cache runs/demo/cache-train --dtype fp32 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from layers import Step, timed
from mxd.activations import ActivationCache, HarvestConfig, harvest
from mxd.train import LayerSpec, OptimConfig, TrainConfig, Trainer


def ensure_cache(path: str, tokens: int) -> ActivationCache:
    """The cache at `path`, harvested there first (SmolLM2-135M layer 15, bf16) if it holds none."""
    if not (Path(path) / "manifest.json").exists():
        harvest(HarvestConfig(out=path, layers=[15], max_tokens=tokens, dtype="bf16", model_dtype="bf16"))
    return ActivationCache(path)


def trainer_rate(cfg: TrainConfig, warmup: int) -> float:
    """Steady-state tokens/s of `Trainer(cfg).train()`, from its per-step metrics records."""
    Trainer(cfg, progress=False).train()
    records = [json.loads(line) for line in open(Path(cfg.out) / "metrics.jsonl")]
    records = [r for r in records if "tokens_per_s" in r]
    # each record's rate is cumulative from the first step: recover its elapsed time
    elapsed = {r["step"]: r["tokens"] / r["tokens_per_s"] for r in records}
    first, last = warmup, max(elapsed)
    return (last - first) * cfg.batch_tokens / (elapsed[last] - elapsed[first])


def bare_rate(cfg: TrainConfig, steps: int) -> list[float]:
    """Seconds per bare step of a Trainer's own layer and optimiser on one cached batch held in memory."""
    trainer = Trainer(cfg, progress=False)
    step = Step(trainer.layer, "ours", "bf16" if cfg.autocast == "bf16" else "fp32", opt=trainer.opt)
    x, y = next(trainer.cache.batches(trainer.layer_index, cfg.batch_tokens))
    x, y = x.float(), y.float()
    step(x, y)  # warm-up
    return [timed(lambda: step(x, y)) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="cache/bench-L15", help="activation cache (harvested here if missing)")
    parser.add_argument("--harvest-tokens", type=int, default=100_000, help="tokens to harvest when the cache is missing")
    parser.add_argument("--n-experts", type=int, default=16384, help="MxD expert count N")
    parser.add_argument("--k", type=int, default=32, help="active experts per token")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="fp32, or bf16 CPU autocast")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=15, help="Trainer steps (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=3, help="Trainer steps before timing starts")
    parser.add_argument("--bare-steps", type=int, default=4, help="bare steps timed before and after the Trainer")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    cache = ensure_cache(args.cache, args.harvest_tokens)
    with tempfile.TemporaryDirectory() as out:
        never = 10 * args.steps
        cfg = TrainConfig(out=f"{out}/run", cache=args.cache, train_tokens=args.steps * args.batch,
                          batch_tokens=args.batch, autocast="bf16" if args.dtype == "bf16" else "none",
                          eval_every=never, checkpoint_every=never, log_every=1,
                          sparse=LayerSpec(kind="mxd", k=args.k, n_experts=args.n_experts),
                          optim=OptimConfig(lr=1e-4, warmup_steps=1))
        before = bare_rate(replace(cfg, out=f"{out}/bare-before"), args.bare_steps)
        train_tok_s = trainer_rate(cfg, args.warmup)
        after = bare_rate(replace(cfg, out=f"{out}/bare-after"), args.bare_steps)
    bare_tok_s = args.batch / statistics.median(before + after)
    result = {
        "cache": args.cache, "cache_dtype": str(cache.dtype), "n_experts": args.n_experts, "k": args.k,
        "dtype": args.dtype, "batch_tokens": args.batch, "trainer_steps": args.steps, "warmup": args.warmup,
        "trainer_tokens_per_s": train_tok_s, "bare_tokens_per_s": bare_tok_s, "ratio": train_tok_s / bare_tok_s,
        "bare_step_s": before + after, "load_avg_1min": os.getloadavg()[0], "threads": torch.get_num_threads(),
    }
    print(f"MxD N={args.n_experts} K={args.k} {args.dtype}, batch {args.batch}: Trainer {train_tok_s:,.0f} tok/s, "
          f"bare layer step {bare_tok_s:,.0f} tok/s, ratio {result['ratio']:.1%} (load {result['load_avg_1min']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
