"""Train EleutherAI sparsify's transcoder with its own Trainer and defaults, on this CPU.

    python experiments/peer-sparsify/train_sparsify.py --out runs/peer-sparsify --tokens 2048000 --k 32

What differs from `python -m sparsify MODEL DATASET --transcode ...` (sparsify 1.3.3), and why:
- Model loading: sparsify's `load_artifacts` puts the model on `cuda:{rank}`. Here the same weights
  (SmolLM2-135M-Instruct, the base `LlamaModel` as sparsify's AutoModel gives for the fvu loss) come
  from mxd's embedded copy, in bf16 on the CPU, as sparsify loads them on a bf16-capable GPU.
- Autocast: sparsify wraps `SparseCoder.forward` in CUDA bf16 autocast; on the CPU that decorator
  does nothing and the fp32 coder would meet the bf16 activations, so the forward runs under CPU bf16
  autocast instead (the same arithmetic sparsify does on a GPU).
- Data: the same token blocks mxd trains on (the train split of the built-in corpus, context 128,
  test_fraction 0.1), as a tokenized dataset; sparsify shuffles it with its own default seed (42).
Everything else is sparsify's default TrainConfig: batch 32 sequences, FVU loss, sign-SGD inside
schedule-free at lr 5e-3 / √(M / 2^14), decoder at zero, biases from the first batch, no AuxK.
The coder lands in OUT/RUN_NAME/layers.15.mlp (cfg.json + sae.safetensors), which `mxd eval` reads.
"""

import argparse
import functools
import time

import torch
from datasets import Dataset
from sparsify import SparseCoder, Trainer
from sparsify.config import SparseCoderConfig, TrainConfig

from mxd.data import DataConfig, load_blocks
from mxd.models import load_model


def cpu_autocast(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/peer-sparsify")
    parser.add_argument("--run-name", default="sparsify-k32")
    parser.add_argument("--tokens", type=int, default=2_048_000, help="training tokens (whole 128-token blocks)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--skip", action="store_true", help="a skip transcoder")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    args = parser.parse_args()

    SparseCoder.forward = cpu_autocast(SparseCoder.forward)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    blocks = load_blocks(DataConfig(test_fraction=args.test_fraction), tokenizer, "train", args.tokens)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()}).shuffle(42).with_format("torch")
    cfg = TrainConfig(SparseCoderConfig(expansion_factor=args.expansion, k=args.k, transcode=True,
                                        skip_connection=args.skip),
                      hookpoints=[f"layers.{args.layer}.mlp"], log_to_wandb=False, save_dir=args.out,
                      run_name=args.run_name)
    start = time.perf_counter()
    Trainer(cfg, dataset, model.model).fit()
    print(f"sparsify: {blocks.numel():,} tokens in {time.perf_counter() - start:.0f} s; "
          f"coder in {args.out}/{args.run_name}/layers.{args.layer}.mlp")


if __name__ == "__main__":
    main()
