"""Optimisers and learning-rate schedules for the trainer.

    opt = make_optimizer(OptimConfig(optimizer="signum"), layer.parameters(), lr=resolved_lr)

"adam" / "adamw" are torch's fused Adam(W) under the warm-up + decay schedule of `lr_factor`.
"signum" is the recipe of EleutherAI's sparsify: sign-SGD (steepest descent in the L∞ norm) inside
Meta's schedule-free wrapper (momentum 0.95). A schedule-free optimiser keeps two sequences: the
parameters hold the training point y while training; `eval()` moves them to the averaged point x
that is evaluated and saved, `train()` moves them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import Tensor

OPTIMIZERS = ("adam", "adamw", "signum")
DECAYS = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    optimizer: adam, adamw or signum (sign-SGD inside schedule-free, sparsify's recipe) (None: the
    method's default, signum for transcoders and adam for MxD); lr: peak learning rate (None: the
    method's default, scaled with its width, see docs/training.md); lr_scale: multiplier of that
    learning rate (a sweep's learning-rate grid sets it); beta1, beta2: Adam betas; weight_decay:
    AdamW's; grad_clip: max gradient norm (0: off); warmup_steps: linear warm-up from 0 (None: 0
    with signum, 100 otherwise); decay: constant, linear or cosine after warm-up, down to
    min_lr_ratio x lr at the last step (None: constant with signum, which is schedule-free, linear
    otherwise)
    """

    optimizer: str | None = None
    lr: float | None = None
    lr_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int | None = None
    decay: str | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is invalid: valid values are {', '.join(OPTIMIZERS)}")
        if self.decay is not None and self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} is invalid: valid values are {', '.join(DECAYS)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid: must be > 0 (or None for the method's default)")
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale={self.lr_scale} is invalid: must be > 0")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip={self.grad_clip} is invalid: must be >= 0 (0: off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} is invalid: must be in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} is invalid: must be >= 0")

    def resolved(self, kind: str) -> "OptimConfig":
        """This config with the method's defaults in place of None (the learning rate aside, which
        depends on the layer's width: `default_lr`)."""
        optimizer = self.optimizer or ("adam" if kind == "mxd" else "signum")
        signum = optimizer == "signum"
        return replace(self, optimizer=optimizer, warmup_steps=(0 if signum else 100) if self.warmup_steps is None else
                       self.warmup_steps, decay=self.decay or ("constant" if signum else "linear"))

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of lr at optimiser step `step` (0-based) of `total`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        shape = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[self.decay]
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def default_lr(optimizer: str, kind: str, n_latents: int) -> float:
    """The learning rate used when none is given: MxD 3e-3 with Adam; transcoders scaled with
    width as sparsify does, 5e-3 / √(M / 2^14) with signum and 2e-4 / √(M / 2^14) with Adam."""
    if optimizer == "signum":
        return 5e-3 / math.sqrt(max(n_latents, 1) / 2**14)
    if kind == "mxd":
        return 3e-3
    return 2e-4 / math.sqrt(n_latents / 2**14)


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(∇p): steepest descent in the L∞ norm (Bernstein et al. 2018)."""

    def __init__(self, params: Iterable[Tensor], lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def make_optimizer(cfg: OptimConfig, params: Iterable[Tensor], lr: float):
    """The optimiser of `cfg` at peak learning rate `lr`; a schedule-free one starts in train mode."""
    params = list(params)
    if cfg.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=0.95)
        opt.train()
        return opt
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=True)
