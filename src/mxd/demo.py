"""The main job end to end on the embedded defaults: harvest one MLP, train an MxD and a
parameter-matched TopK transcoder on it, and compare them on held-out tokens (`make demo`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mxd.activations import HarvestConfig, harvest
from mxd.data import DataConfig
from mxd.layers import load
from mxd.models import DEFAULT_MODEL, load_model
from mxd.train import LayerSpec, OptimConfig, Trainer, TrainConfig


@dataclass
class DemoConfig:
    """The demo's sizes.

    out: folder for caches and runs; model: embedded name, folder or Hub id; layer: the MLP to
    decompose; source: text source; train_tokens: tokens harvested and trained on (one epoch);
    val_tokens: held-out tokens; k: active experts/latents; expansion: parameter budget, a
    transcoder of width expansion x d; batch_tokens: tokens per step; lr: peak learning rate
    """

    out: str = "runs/demo"
    model: str = DEFAULT_MODEL
    layer: int = 15
    source: str = "builtin"
    train_tokens: int = 500_000
    val_tokens: int = 40_960
    k: int = 32
    expansion: int = 16
    batch_tokens: int = 1024
    lr: float = 1e-3


def run_demo(cfg: DemoConfig) -> list[dict]:
    """Harvest (resumable), train both layers (resumable), return one result row per method."""
    out = Path(cfg.out)
    model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16)
    data = DataConfig(source=cfg.source)
    caches = {}
    for split, tokens in (("train", cfg.train_tokens), ("validation", cfg.val_tokens)):
        path = out / f"cache-{split}"
        if not (path / "manifest.json").exists() or not json.loads((path / "manifest.json").read_text())["complete"]:
            harvest(HarvestConfig(out=str(path), model=cfg.model, layers=[cfg.layer], split=split, max_tokens=tokens,
                                  model_dtype="bf16", data=data), model, tokenizer)
        caches[split] = str(path)
    rows = []
    for kind in ("mxd", "transcoder"):
        run = out / kind
        train_cfg = TrainConfig(
            out=str(run), cache=caches["train"], val_cache=caches["validation"], train_tokens=cfg.train_tokens,
            batch_tokens=cfg.batch_tokens, autocast="bf16", eval_every=100, val_tokens=cfg.val_tokens,
            resume=(run / "config.json").exists(), sparse=LayerSpec(kind=kind, k=cfg.k, expansion=cfg.expansion),
            optim=OptimConfig(lr=cfg.lr, warmup_steps=min(100, cfg.train_tokens // cfg.batch_tokens // 10)),
        )
        if not (run / "final" / "model.safetensors").exists():
            Trainer(train_cfg).train()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in records if "val_nmse" in r][-1]
        layer = load(run / "final")
        rows.append({"method": kind, "params": layer.param_count(), "latents": layer.n_latents,
                     "nmse": val["val_nmse"], "fvu": val["val_fvu"], "l0": val["val_l0"], "dead": val["val_dead"],
                     "run": str(run)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':12} {'params':>11} {'latents':>8} {'nmse':>7} {'fvu':>7} {'l0':>6} {'dead':>6}  run"]
    for r in rows:
        lines.append(f"{r['method']:12} {r['params']:11,} {r['latents']:8,} {r['nmse']:7.4f} {r['fvu']:7.4f} "
                     f"{r['l0']:6.1f} {100 * r['dead']:5.1f}%  {r['run']}")
    return "\n".join(lines)
