"""The main job end to end on the embedded defaults: harvest one MLP, train an MxD and a
parameter-matched TopK transcoder on it, evaluate both on held-out tokens (reconstruction and the
model's next-token loss with each spliced in) and draw the report (`make demo`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mxd.activations import MANIFEST, HarvestConfig, harvest, read_manifest
from mxd.checks import check_out
from mxd.data import DataConfig
from mxd.evaluate import EvalConfig
from mxd.models import DEFAULT_MODEL, load_model
from mxd.report import ReportConfig, write_report
from mxd.sweep import SweepConfig, run_sweep
from mxd.train import LayerSpec, OptimConfig, TrainConfig


@dataclass
class DemoConfig:
    """The demo's sizes.

    out: folder for caches and runs; model: embedded name, folder or Hub id; layer: the MLP to
    decompose; source: text source; train_tokens: tokens harvested and trained on (one epoch);
    val_tokens: held-out tokens (validation and evaluation); k: active experts/latents; expansion: parameter budget, a
    transcoder of width expansion x d; batch_tokens: tokens per step (None: each method's default); lr: peak learning rate (None:
    each method's default, see docs/training.md)
    """

    out: str = "runs/demo"
    model: str = DEFAULT_MODEL
    layer: int = 15
    source: str = "builtin"
    train_tokens: int = 500_000
    val_tokens: int = 40_960
    k: int = 32
    expansion: int = 16
    batch_tokens: int | None = None
    lr: float | None = None

    def __post_init__(self):
        check_out(self.out)


def run_demo(cfg: DemoConfig) -> tuple[list[dict], Path]:
    """Harvest (resumable), train and evaluate both layers as a sweep (resumable); (records, report path)."""
    out = Path(cfg.out)
    model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16)
    data = DataConfig(source=cfg.source)
    caches = {}
    for split, tokens in (("train", cfg.train_tokens), ("validation", cfg.val_tokens)):
        path = out / f"cache-{split}"
        if not (path / MANIFEST).exists() or not read_manifest(path)["complete"]:
            harvest(HarvestConfig(out=str(path), model=cfg.model, layers=[cfg.layer], split=split, max_tokens=tokens,
                                  model_dtype="bf16", data=data), model, tokenizer)
        caches[split] = str(path)
    train = TrainConfig(
        out=str(out), cache=caches["train"], val_cache=caches["validation"], train_tokens=cfg.train_tokens,
        batch_tokens=cfg.batch_tokens, autocast="bf16", eval_every=100, val_tokens=cfg.val_tokens,
        sparse=LayerSpec(k=cfg.k, expansion=cfg.expansion),
        optim=OptimConfig(lr=cfg.lr),
    )
    sweep = SweepConfig(train=train, methods=["mxd", "transcoder"], eval=EvalConfig(eval_tokens=cfg.val_tokens))
    records = run_sweep(sweep)
    report = write_report(ReportConfig(inputs=[train.out], out=str(out / "report"), title="mxd demo"))
    return records, report


def format_table(records: list[dict]) -> str:
    lines = [f"{'method':12} {'params':>11} {'latents':>8} {'nmse':>7} {'fvu':>7} {'l0':>6} {'dead':>6} "
             f"{'delta_ce':>9} {'ce_recov':>9} {'kl':>7}  run"]
    for r in records:
        lines.append(f"{r['method']:12} {r['n_params']:11,} {r['n_latents']:8,} {r['nmse']:7.4f} {r['fvu']:7.4f} "
                     f"{r['l0']:6.1f} {100 * r['dead']:5.1f}% {r['delta_ce']:9.4f} {r['ce_recovered']:9.4f} "
                     f"{r['kl']:7.4f}  {r['run']}")
    return "\n".join(lines)
