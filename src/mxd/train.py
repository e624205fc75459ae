"""Train a sparse layer (MxD or a transcoder) to reproduce one MLP from a harvested activation cache.

    run = Trainer(TrainConfig(cache="cache/L15", val_cache="cache/L15-val", out="runs/mxd"))
    run.train()

A run folder holds `config.json` (the TrainConfig), `metrics.jsonl` (one record per logged step
and per evaluation), `final/` (the trained layer: `mxd.load`-able) and `checkpoints/step-N/`
(layer weights, optimiser state, trainer state) of which the last `keep_last` and the best by
validation nmse are kept. Checkpoints are written to a temporary folder and renamed, so a crash
never leaves a half-written one; `resume=True` continues bit for bit (CPU) from the newest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mxd.activations import ActivationCache
from mxd.layers import MxD, MxDConfig, SkipTranscoder, SparseCodes, SparseLayer, Transcoder, TranscoderConfig, load, match_n_experts
from mxd.sparse_ops import sparse_decode

KINDS = ("mxd", "transcoder", "skip_transcoder")
DECAYS = ("constant", "linear", "cosine")
LOSSES = ("nmse", "token_nmse")


@dataclass
class LayerSpec:
    """Which sparse layer to train; sizes not given come from the cache's host MLP.

    kind: mxd, transcoder or skip_transcoder; k: active experts/latents per token;
    expansion: parameter budget, a transcoder of width expansion x d_in (MxD's expert count is
    matched to it); n_experts: MxD expert count, overriding the match; sparsity: topk, or l1 for a
    ReLU transcoder; l1_coef: weight of the L1 penalty (sparsity=l1); unit_norm: keep MxD modulators
    (or transcoder decoder rows) at unit norm; decoder_init_std: std of MxD's shared decoder init
    """

    kind: str = "mxd"
    k: int = 32
    expansion: int = 16
    n_experts: int | None = None
    sparsity: str = "topk"
    l1_coef: float = 1e-3
    unit_norm: bool = False
    decoder_init_std: float = 0.01

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: valid values are {', '.join(KINDS)}")
        if self.expansion < 1:
            raise ValueError(f"expansion={self.expansion} is invalid: must be >= 1")

    def build(self, d_in: int, d_out: int, host: dict) -> SparseLayer:
        """The layer, sized for an MLP d_in -> d_out whose form is `host` (see models.host_mlp)."""
        width = self.expansion * d_in
        if self.kind == "mxd":
            glu = host["glu"]
            n = self.n_experts or match_n_experts(d_in, d_out, host["d_hidden"], width, glu=glu)
            return MxD(MxDConfig(d_in, d_out, host["d_hidden"], n, self.k, activation=host["activation"], glu=glu,
                                 unit_norm_modulators=self.unit_norm, decoder_init_std=self.decoder_init_std))
        cls = SkipTranscoder if self.kind == "skip_transcoder" else Transcoder
        return cls(TranscoderConfig(d_in, d_out, width, self.k, sparsity=self.sparsity, unit_norm_decoder=self.unit_norm))


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    optimizer: adam or adamw; lr: peak learning rate; beta1, beta2: Adam betas; weight_decay: AdamW's;
    grad_clip: max gradient norm (0: off); warmup_steps: linear warm-up from 0; decay: constant,
    linear or cosine after warm-up, down to min_lr_ratio x lr at the last step
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 100
    decay: str = "linear"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r} is invalid: valid values are 'adam', 'adamw'")
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} is invalid: valid values are {', '.join(DECAYS)}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid: must be > 0")

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of lr at optimiser step `step` (0-based) of `total`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        shape = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[self.decay]
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass
class TrainConfig:
    """A training run.

    out: run folder; cache: harvested training activations; val_cache: held-out activations for
    validation (harvest with --split validation); layer: the cache's layer to train (default: its
    first); train_tokens: training budget (epochs over the cache as needed); batch_tokens: tokens
    per optimiser step; seed: layer init and data order; autocast: none or bf16; loss: nmse
    (sum of squared errors / sum of squared targets, per batch) or token_nmse (the paper's
    per-token squared error / target norm, averaged); eval_every: steps between validations;
    val_tokens: held-out tokens per validation; checkpoint_every: steps between checkpoints;
    keep_last: checkpoints kept besides the best; dead_window: tokens without firing after which a
    latent counts as dead; aux_k: latents in the dead-latent auxiliary loss (0: off); aux_coef: its
    weight; balance_coef: weight of the load-balancing loss (0: off); log_every: steps between
    metrics records; resume: continue the run in out from its newest checkpoint
    """

    out: str = "runs/mxd"
    cache: str = "cache/activations"
    val_cache: str | None = None
    layer: int | None = None
    train_tokens: int = 1_000_000
    batch_tokens: int = 1024
    seed: int = 0
    autocast: str = "none"
    loss: str = "nmse"
    eval_every: int = 250
    val_tokens: int = 40_960
    checkpoint_every: int = 500
    keep_last: int = 2
    dead_window: int = 1_000_000
    aux_k: int = 0
    aux_coef: float = 1 / 32
    balance_coef: float = 0.0
    log_every: int = 10
    resume: bool = False
    sparse: LayerSpec = field(default_factory=LayerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if isinstance(self.sparse, dict):
            self.sparse = LayerSpec(**self.sparse)
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast={self.autocast!r} is invalid: valid values are 'none', 'bf16'")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is invalid: valid values are {', '.join(LOSSES)}")
        for name in ("batch_tokens", "eval_every", "checkpoint_every", "keep_last", "log_every", "dead_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.train_tokens < self.batch_tokens:
            raise ValueError(f"train_tokens={self.train_tokens} is too small for one step of batch_tokens={self.batch_tokens}")

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_tokens

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def reconstruction_loss(y_hat: Tensor, y: Tensor, kind: str = "nmse") -> Tensor:
    """nmse: Σ‖ŷ−y‖² / Σ‖y‖² over the batch; token_nmse: mean over tokens of ‖ŷ−y‖² / ‖y‖."""
    err = (y_hat.float() - y.float()).pow(2).sum(-1)  # [B]
    if kind == "nmse":
        return err.sum() / y.float().pow(2).sum().clamp_min(1e-12)
    return (err / y.float().norm(dim=-1).clamp_min(1e-6)).mean()


def _aux_dead_loss(layer: SparseLayer, x: Tensor, residual: Tensor, dead: Tensor, k: int) -> Tensor:
    """AuxK: how well the top-k dead latents alone reconstruct the residual y − ŷ.

    Only the dead latents' own parameters (router/encoder rows, modulators/decoder rows) get its
    gradient; MxD's shared decoder output Dᵀz is held fixed.
    """
    dead_idx = dead.nonzero().squeeze(1)
    enc = layer.router if isinstance(layer, MxD) else layer.encoder
    logits = torch.nn.functional.linear(x, enc.weight[dead_idx], enc.bias[dead_idx])  # [B, n_dead]
    values, pos = logits.topk(min(k, len(dead_idx)), dim=-1)
    indices, values = dead_idx[pos], values.relu()
    if isinstance(layer, MxD):
        out = layer.decoder(layer.hidden(x)).detach() * sparse_decode(indices, values, layer.modulators)
    else:
        out = sparse_decode(indices, values, layer.decoder)
    return reconstruction_loss(out, residual.detach())


def _balance_loss(codes: SparseCodes, n: int) -> Tensor:
    """Switch-style N · Σ_n f_n p_n: f_n the share of routing slots, p_n the share of coefficient mass."""
    f = torch.zeros(n, device=codes.indices.device).index_add_(0, codes.indices.flatten(), torch.ones(codes.indices.numel(), device=codes.indices.device))
    v = codes.values.float()
    p = torch.zeros(n, device=v.device).index_add(0, codes.indices.flatten(), (v / v.sum(-1, keepdim=True).clamp_min(1e-9)).flatten())
    return n * (f / f.sum() * p / len(v)).sum()


class Trainer:
    """Trains `config.sparse` on a cache; see the module docstring for what a run folder holds."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.cfg = config
        self.progress = progress
        self.out = Path(config.out)
        self.cache = ActivationCache(config.cache)
        self.layer_index = config.layer if config.layer is not None else self.cache.layers[0]
        self.cache.check_matches(self.cache.manifest["model"], self.layer_index)
        self.val = ActivationCache(config.val_cache) if config.val_cache else None
        if self.val is not None:
            self.val.check_matches(self.cache.manifest["model"], self.layer_index)
            if self.val.manifest["split"] == self.cache.manifest["split"] and self.val.manifest["data"] == self.cache.manifest["data"]:
                raise ValueError(f"val_cache {config.val_cache} holds the same split of the same data as the training cache")
        self._prepare_out()
        torch.manual_seed(config.seed)
        m = self.cache.manifest
        self.layer = config.sparse.build(m["d_in"], m["d_out"], m["host_mlp"])
        opt_cls = torch.optim.AdamW if config.optim.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.layer.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                           weight_decay=config.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: config.optim.lr_factor(s, config.steps))
        self.step = 0
        self.best_val = math.inf
        self.last_fired = torch.zeros(self.layer.n_latents, dtype=torch.long)  # token count at last firing
        if config.resume:
            self._load_checkpoint()

    # --- run folder ----------------------------------------------------------------------------

    def _prepare_out(self) -> None:
        config_path = self.out / "config.json"
        wanted = self.cfg.to_dict() | {"resume": False}
        if config_path.exists():
            existing = json.loads(config_path.read_text()) | {"resume": False}
            if not self.cfg.resume:
                raise ValueError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            if existing != wanted:
                diffs = [k for k in wanted if existing.get(k) != wanted[k]]
                raise ValueError(f"cannot resume {self.out} with a different config (differs in: {', '.join(diffs)})")
        elif self.cfg.resume:
            raise ValueError(f"nothing to resume: {self.out} holds no run")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            config_path.write_text(json.dumps(wanted, indent=1) + "\n")

    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- checkpoints ---------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        folder = self.out / "checkpoints"
        found = [p for p in folder.glob("step-*") if (p / "state.json").exists()] if folder.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, is_best: bool = False) -> Path:
        if not all(torch.isfinite(p).all() for p in self.layer.parameters()):
            raise TrainingDiverged(f"non-finite weights at step {self.step}; the last good checkpoint is kept")
        folder = self.out / "checkpoints"
        final = folder / f"step-{self.step}"
        tmp = folder / f".tmp-step-{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.layer.save(tmp / "layer")
        opt_state = self.opt.state_dict()
        tensors = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
        tensors |= {"rng": torch.get_rng_state(), "last_fired": self.last_fired}
        save_file(tensors, str(tmp / "trainer.safetensors"))
        state = {"step": self.step, "best_val": self.best_val, "param_groups": opt_state["param_groups"],
                 "scheduler": self.sched.state_dict(), "is_best": is_best}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        checkpoints = self._checkpoints()
        best = [p for p in checkpoints if json.loads((p / "state.json").read_text())["is_best"]]
        keep = set(checkpoints[-self.cfg.keep_last :]) | set(best[-1:])
        for old in checkpoints:
            if old not in keep:
                shutil.rmtree(old)
        return final

    def _load_checkpoint(self) -> None:
        checkpoints = self._checkpoints()
        if not checkpoints:
            return  # the run stopped before its first checkpoint: start over
        path = checkpoints[-1]
        self.layer.load_state_dict(load(path / "layer").state_dict())
        tensors = load_file(str(path / "trainer.safetensors"))
        state = json.loads((path / "state.json").read_text())
        opt_state = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            if key[0].isdigit():
                i, name = key.split(".", 1)
                opt_state["state"].setdefault(int(i), {})[name] = value
        self.opt.load_state_dict(opt_state)
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng"])
        self.last_fired = tensors["last_fired"]
        self.step, self.best_val = state["step"], state["best_val"]

    # --- training ------------------------------------------------------------------------------

    def _batches(self):
        """(x, y) batches from the current step on, epoch after epoch."""
        per_epoch = self.cache.n_tokens // self.cfg.batch_tokens
        if per_epoch == 0:
            raise ValueError(f"batch_tokens={self.cfg.batch_tokens} exceeds the cache's {self.cache.n_tokens} tokens")
        step = self.step
        while True:
            epoch, start = divmod(step, per_epoch)
            for x, y in self.cache.batches(self.layer_index, self.cfg.batch_tokens, seed=self.cfg.seed, epoch=epoch, start=start):
                if len(x) < self.cfg.batch_tokens:
                    break
                yield x, y
                step += 1

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16")

    def _train_step(self, x: Tensor, y: Tensor) -> dict:
        cfg = self.cfg
        x, y = x.float(), y.float()
        with self._autocast():
            y_hat, codes = self.layer(x)
            loss = reconstruction_loss(y_hat, y, cfg.loss)
            total = loss
            if cfg.sparse.sparsity == "l1" and cfg.sparse.kind != "mxd":
                total = total + cfg.sparse.l1_coef * self.layer.l1_penalty(codes)
            tokens_seen = (self.step + 1) * cfg.batch_tokens
            dead = (tokens_seen - self.last_fired) > cfg.dead_window
            if cfg.aux_k and dead.any():
                total = total + cfg.aux_coef * _aux_dead_loss(self.layer, x, y - y_hat, dead, cfg.aux_k)
            if cfg.balance_coef:
                total = total + cfg.balance_coef * _balance_loss(codes, self.layer.n_latents)
        if not torch.isfinite(total):
            raise TrainingDiverged(f"the loss became {total.item()} at step {self.step}; the last good checkpoint is kept")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.layer.project_gradients_()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.layer.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.layer.normalize_weights_()
        fired = codes.indices[codes.values > 0].unique()
        self.last_fired[fired] = tokens_seen
        return {"loss": loss.item(), "l0": (codes.values > 0).sum(-1).float().mean().item(),
                "dead": dead.float().mean().item()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation nmse, fvu, l0 and dead (share of latents that never fired) over val_tokens tokens."""
        err = sq = l0 = n = 0.0
        sum_y = None
        fired = torch.zeros(self.layer.n_latents, dtype=torch.bool)
        for x, y in self.val.batches(self.layer_index, 4096, shuffle=False):
            with self._autocast():
                y_hat, codes = self.layer(x.float())
            y = y.float()
            err += (y_hat.float() - y).pow(2).sum().item()
            sq += y.pow(2).sum().item()
            sum_y = y.sum(0) if sum_y is None else sum_y + y.sum(0)
            l0 += (codes.values > 0).sum().item()
            fired[codes.indices[codes.values > 0]] = True
            n += len(y)
            if n >= self.cfg.val_tokens:
                break
        var = sq - sum_y.pow(2).sum().item() / n
        return {"val_nmse": err / sq, "val_fvu": err / var, "val_l0": l0 / n, "val_dead": 1 - fired.float().mean().item()}

    def train(self) -> SparseLayer:
        cfg = self.cfg
        bar = tqdm(total=cfg.steps * cfg.batch_tokens, initial=self.step * cfg.batch_tokens, unit="tok",
                   unit_scale=True, desc=f"{cfg.sparse.kind} k={cfg.sparse.k}", disable=not self.progress)
        start_time, start_step = time.perf_counter(), self.step
        batches = self._batches()
        interrupted = []
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if in_main else None  # finish the step first
        try:
            while self.step < cfg.steps:
                if interrupted:
                    self.save_checkpoint()
                    raise KeyboardInterrupt
                x, y = next(batches)
                stats = self._train_step(x, y)
                self.step += 1
                bar.update(cfg.batch_tokens)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    rate = (self.step - start_step) * cfg.batch_tokens / (time.perf_counter() - start_time)
                    record = {"step": self.step, "tokens": self.step * cfg.batch_tokens, "lr": self.sched.get_last_lr()[0],
                              "tokens_per_s": rate, **stats}
                    self._log(record)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", l0=f"{stats['l0']:.1f}", dead=f"{100 * stats['dead']:.1f}%")
                is_best = False
                if self.val is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    metrics = self.evaluate()
                    self._log({"step": self.step, "tokens": self.step * cfg.batch_tokens, **metrics})
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", val_nmse=f"{metrics['val_nmse']:.4f}", dead=f"{100 * stats['dead']:.1f}%")
                    is_best = metrics["val_nmse"] < self.best_val
                    self.best_val = min(self.best_val, metrics["val_nmse"])
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or is_best:
                    self.save_checkpoint(is_best)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
            bar.close()
        self.layer.save(self.out / "final")
        return self.layer
