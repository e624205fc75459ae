"""Train sparse layers (MxD or transcoders) to reproduce MLPs, from a harvested cache or streamed activations.

    Trainer(TrainConfig(cache="cache/L15", val_cache="cache/L15-val", out="runs/mxd")).train()
    train_runs(TrainConfig(model="smollm2-135m", layers=[8, 15], ks=[16, 32], out="runs/grid"))
    torchrun --nproc_per_node=2 -m mxd train --cache cache/L15 ...    (ranks split every batch)

A run folder holds `config.json` (the TrainConfig), `metrics.jsonl` (one record per logged step
and per evaluation), `final/` (the trained layer: `mxd.load`-able) and `checkpoints/step-N/`
(layer weights, optimiser state, trainer state) of which the last `keep_last` and the best by
validation nmse are kept. Checkpoints and `final/` are written to a temporary folder and renamed,
so a crash or a full disk never leaves a half-written one; each checkpoint's state.json records
the SHA-256 of its other files. `resume=True` continues bit for bit (CPU) from the newest
checkpoint that passes its checksums and holds finite numbers (a damaged newer one is renamed
damaged-step-N and reported). Everything is checked before config.json is written, so a refused
run leaves nothing behind; a loss or validation nmse that becomes NaN/Inf stops the run naming
the step (and, when the data holds the NaN, the cache chunks).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from itertools import count, islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from mxd.checks import check_at_least, check_device, check_out
from mxd.activations import DTYPES, MANIFEST, ActivationCache, rank_and_world, site_dims, stream_activations
from mxd.data import DataConfig
from mxd.files import (DamagedFileError, check_sha256, load_tensors, read_json, save_tensors, sha256,
                       write_folder_atomic, write_json_atomic)
from mxd.layers import (MxD, MxDConfig, SkipTranscoder, SparseCodes, SparseLayer, Transcoder, TranscoderConfig, load,
                        match_n_experts, match_skip_width)
from mxd.metrics import firing_metrics
from mxd.models import check_context_len, check_module_path, find_mlp, host_mlp, load_model
from mxd.optim import OptimConfig, default_lr, make_optimizer
from mxd.sparse_ops import sparse_decode
from mxd.tracking import MetricsLogger, check_trackers

KINDS = ("mxd", "transcoder", "skip_transcoder")
LOSSES = ("nmse", "token_nmse")
PLACEMENTS = ("replicate", "spread")
DEFAULT_BATCH_TOKENS = {"mxd": 1024, "transcoder": 4096, "skip_transcoder": 4096}  # measured: docs/training.md
# MxD forms (docs/training.md): the paper's exact one, and the default, whose dense modulation c0 + W_m x takes
# what always-on experts did, while balanced, signed routing spreads the K slots over the experts
MXD_VARIANTS = {
    "paper": {"shared_modulator": False, "linear_modulation": False, "balance_rate": 0.0, "balance_cap": 0.0,
              "coefficients": "relu", "modulator_init": "uniform"},
    "balanced": {"shared_modulator": True, "linear_modulation": True, "balance_rate": 1e-2, "balance_cap": 0.0,
                 "coefficients": "signed", "modulator_init": "uniform"},
}
DEFAULT_VARIANT = "balanced"
# sweep methods: a layer kind, or an MxD variant (method name -> (kind, variant))
METHODS = {"mxd": ("mxd", None), "mxd_paper": ("mxd", "paper"), "transcoder": ("transcoder", None),
           "skip_transcoder": ("skip_transcoder", None)}
CHECKPOINT_FILES = ("layer/config.json", "layer/model.safetensors", "trainer.safetensors")  # checksummed in state.json
PATH_FIELDS = ("cache", "val_cache", "model", "source")  # compared as the folders they name when resuming
log = logging.getLogger("mxd")


def method_spec(spec: "LayerSpec", method: str) -> "LayerSpec":
    """`spec` for a sweep method: its kind, and for a named MxD variant that variant's exact form."""
    kind, variant = METHODS[method]
    if variant is None:
        return replace(spec, kind=kind)
    return replace(spec, kind=kind, variant=variant, **{name: None for name in MXD_VARIANTS[variant]})


def method_name(sparse: dict) -> str:
    """The sweep method a run's LayerSpec (as a dict) stands for: its kind, or mxd_VARIANT for a
    non-default MxD variant."""
    variant = sparse.get("variant", "paper")  # runs from before variants were the paper's form
    return f"mxd_{variant}" if sparse["kind"] == "mxd" and variant != DEFAULT_VARIANT else sparse["kind"]


@dataclass
class LayerSpec:
    """Which sparse layer to train; sizes not given come from the cache's host MLP.

    kind: mxd, transcoder or skip_transcoder; k: active experts/latents per token (mxd with k = 0:
    the dense-only reference, y = (Dᵀz) ⊙ c0 + b, no experts); expansion: parameter budget, a
    transcoder of width expansion x d_in (MxD's expert count and a skip transcoder's width are
    matched to it); n_experts: MxD expert count, overriding the match; sparsity: topk, or l1 for a
    ReLU transcoder; l1_coef: weight of the L1 penalty (sparsity=l1); unit_norm: keep MxD modulators
    (or transcoder decoder rows) at unit norm; decoder_init_std: std of MxD's shared decoder init;
    router: MxD's router, flat or product_key (the matched expert count is then rounded to a
    square); router_candidates: rows and columns a product-key router keeps (0: K, exact; fewer is
    cheaper and approximate); variant: MxD form, a preset of the next four fields (see
    MXD_VARIANTS; "paper" is the paper's exact form); shared_modulator: MxD's learned modulator c0
    that every token uses besides its K experts (None: the variant's); linear_modulation: MxD's dense
    input-dependent modulation W_m x, its d_in x d_out parameters paid for with experts (None: the
    variant's); balance_rate: per-step move of the flat MxD router's selection bias that evens out
    expert load, 0 off (None: the variant's); balance_cap: 0 to balance toward equal load, or a
    share of tokens above which an expert is pushed down (dead ones pushed up) (None: the variant's); coefficients: MxD expert coefficients, relu (the
    paper's) or signed (the chosen router logits, so every chosen expert contributes) (None: the
    variant's); modulator_init: MxD modulator init, uniform (the paper's) or zero (None: the
    variant's); decoder_init: transcoder decoder init, zero or uniform
    """

    kind: str = "mxd"
    k: int = 32
    expansion: int = 16
    n_experts: int | None = None
    sparsity: str = "topk"
    l1_coef: float = 1e-3
    unit_norm: bool = False
    decoder_init_std: float = 0.01
    router: str = "flat"
    router_candidates: int = 0
    variant: str = DEFAULT_VARIANT
    shared_modulator: bool | None = None
    linear_modulation: bool | None = None
    balance_rate: float | None = None
    balance_cap: float | None = None
    coefficients: str | None = None
    modulator_init: str | None = None
    decoder_init: str = "zero"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: valid values are {', '.join(KINDS)}")
        if self.variant not in MXD_VARIANTS:
            raise ValueError(f"variant={self.variant!r} is invalid: valid values are {', '.join(MXD_VARIANTS)}")
        check_at_least(self, 1, "expansion")
        if self.k < (self.kind != "mxd"):
            raise ValueError(f"k={self.k} is invalid for kind={self.kind!r}: must be >= {int(self.kind != 'mxd')}"
                             + (" (k = 0 is the dense-only MxD reference)" if self.kind == "mxd" else ""))

    def mxd_form(self) -> dict:
        """The MxD form fields: the variant's preset, overridden by those given explicitly."""
        return MXD_VARIANTS[self.variant] | {k: getattr(self, k) for k in MXD_VARIANTS[self.variant]
                                             if getattr(self, k) is not None}

    def build(self, d_in: int, d_out: int, host: dict) -> SparseLayer:
        """The layer, sized for an MLP d_in -> d_out whose form is `host` (see models.host_mlp)."""
        width = self.expansion * d_in
        if self.kind == "mxd":
            form = self.mxd_form()
            glu, shared = host["glu"], form["shared_modulator"] or self.k == 0
            if self.k == 0:
                n = 0
            else:
                extra = d_out * shared + d_in * d_out * form["linear_modulation"]
                n = self.n_experts or match_n_experts(d_in, d_out, host["d_hidden"], width, glu=glu, extra=extra)
            if self.router == "product_key" and not self.n_experts:
                n = round(math.sqrt(n)) ** 2
            balance_rate = form["balance_rate"] if n else 0.0
            return MxD(MxDConfig(d_in, d_out, host["d_hidden"], n, self.k, activation=host["activation"], glu=glu,
                                 unit_norm_modulators=self.unit_norm, decoder_init_std=self.decoder_init_std,
                                 router=self.router, router_candidates=self.router_candidates, shared_modulator=shared,
                                 linear_modulation=form["linear_modulation"], balance_rate=balance_rate,
                                 balance_cap=form["balance_cap"] if self.router == "flat" else 0.0,
                                 coefficients=form["coefficients"], modulator_init=form["modulator_init"]))
        if self.kind == "skip_transcoder":
            config = TranscoderConfig(d_in, d_out, match_skip_width(d_in, d_out, width), self.k, sparsity=self.sparsity,
                                      unit_norm_decoder=self.unit_norm, decoder_init=self.decoder_init)
            return SkipTranscoder(config)
        return Transcoder(TranscoderConfig(d_in, d_out, width, self.k, sparsity=self.sparsity,
                                           unit_norm_decoder=self.unit_norm, decoder_init=self.decoder_init))


@dataclass
class TrainConfig:
    """A training run, or several runs from one source (one per layer in `layers` and K in `ks`).

    out: run folder (with several layers or ks, a folder holding one run folder per layer and K,
    named layer{L}-k{K}); cache: harvested training activations; val_cache: held-out activations for
    validation (harvest with --split validation); model: stream activations from this model instead
    of a cache (embedded name, folder or Hub id); module_path: override of the MLP module when
    streaming; model_dtype: fp32 or bf16, the dtype the streamed model runs in; buffer_tokens:
    shuffle buffer of streamed activations; device: cpu, cuda or cuda:N (under torchrun, cuda is
    each rank's own GPU); layers: MLP layers to train, one run each (default: the cache's first);
    ks: one run per K in this list (instead of k); placement: under torchrun, replicate (every rank
    takes an equal share of every batch and gradients are summed across ranks) or spread (run i
    trains alone on rank i mod world size); train_tokens: training budget per run (epochs over the
    data as needed); batch_tokens: tokens per optimiser step, over all ranks (None: the method's
    default, 1,024 for MxD and 4,096 for transcoders as in sparsify, see docs/training.md); seed: layer init and
    data order; autocast: none or bf16; loss: nmse (sum of squared errors / sum of squared targets,
    per batch) or token_nmse (the paper's per-token squared error / target norm, averaged);
    eval_every: steps between validations; val_tokens: held-out tokens per validation (streamed
    from the validation split when there is no val_cache and the source is a model);
    checkpoint_every: steps between checkpoints; keep_last: checkpoints kept besides the best;
    dead_window: tokens without firing after which a latent counts as dead; aux_k: dead latents in
    the AuxK auxiliary loss that teaches them the residual (None: d_out // 2, as in the TopK SAE
    paper; 0: off); aux_coef: its weight; balance_coef: weight of the Switch load-balancing loss
    (0: off); data_init: before the first step, set the layer's biases from the first batch's means
    (transcoders: b = mean y, b_e = −W_e mean x; MxD: b = mean y); log_every: steps between metrics records; log_to: trackers fed
    besides metrics.jsonl: tensorboard, wandb; resume: continue the run(s) in out from the newest
    intact checkpoint; allow_partial: train on a cache whose harvest has not finished (refused
    otherwise)
    """

    out: str = "runs/mxd"
    cache: str | None = None
    val_cache: str | None = None
    model: str | None = None
    module_path: str | None = None
    model_dtype: str = "fp32"
    buffer_tokens: int = 262_144
    device: str = "cpu"
    layers: list[int] | None = None
    ks: list[int] | None = None
    placement: str = "replicate"
    train_tokens: int = 1_000_000
    batch_tokens: int | None = None
    seed: int = 0
    autocast: str = "none"
    loss: str = "nmse"
    eval_every: int = 250
    val_tokens: int = 40_960
    checkpoint_every: int = 500
    keep_last: int = 2
    dead_window: int = 100_000
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    balance_coef: float = 0.0
    data_init: bool = True
    log_every: int = 10
    log_to: list[str] = field(default_factory=list)
    resume: bool = False
    allow_partial: bool = False
    sparse: LayerSpec = field(default_factory=LayerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        for name, cls in (("sparse", LayerSpec), ("optim", OptimConfig), ("data", DataConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if (self.cache is None) == (self.model is None):
            raise ValueError(f"give exactly one source: cache (a harvested cache) or model (stream activations); "
                             f"got cache={self.cache!r}, model={self.model!r}")
        if self.model is not None and not self.layers:
            raise ValueError("layers is required when streaming from a model: which MLP to train")
        check_out(self.out)
        _check_not_in_a_cache(self.out)
        check_device(self.device)
        check_module_path(self.module_path)
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype={self.model_dtype!r} is invalid: valid values are {', '.join(DTYPES)}")
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast={self.autocast!r} is invalid: valid values are 'none', 'bf16'")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is invalid: valid values are {', '.join(LOSSES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} is invalid: valid values are {', '.join(PLACEMENTS)}")
        for name in ("layers", "ks"):
            values = getattr(self, name)
            least = int(name == "ks" and self.sparse.kind != "mxd")  # k = 0: the dense-only MxD reference
            if values is not None and (not values or len(set(values)) != len(values) or min(values) < least):
                raise ValueError(f"{name}={values} is invalid: give distinct values >= {least}")
        check_trackers(self.log_to)
        if self.batch_tokens is not None:
            check_at_least(self, 1, "batch_tokens")
        check_at_least(self, 1, "eval_every", "checkpoint_every", "keep_last", "log_every", "dead_window",
                       "buffer_tokens")
        if self.aux_k is not None and self.aux_k < 0:
            raise ValueError(f"aux_k={self.aux_k} is invalid: must be >= 0 (0: off) or None (d_out // 2)")
        for name in ("aux_coef", "balance_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 0")
        if self.train_tokens < (self.batch_tokens or DEFAULT_BATCH_TOKENS[self.sparse.kind]):
            raise ValueError(f"train_tokens={self.train_tokens} is too small for one step of "
                             f"batch_tokens={self.batch_tokens or DEFAULT_BATCH_TOKENS[self.sparse.kind]}")

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_tokens

    def with_method_defaults(self) -> TrainConfig:
        """This config with batch_tokens resolved for its layer kind."""
        return replace(self, batch_tokens=self.batch_tokens or DEFAULT_BATCH_TOKENS[self.sparse.kind])

    def runs(self) -> list[TrainConfig]:
        """One config per (layer, K): this config itself when it names a single run."""
        layers, ks = self.layers or [None], self.ks or [self.sparse.k]
        if len(layers) * len(ks) == 1:
            return [replace(self, ks=None, sparse=replace(self.sparse, k=ks[0]))]
        return [replace(self, out=str(Path(self.out) / (f"layer{layer}-k{k}" if layer is not None else f"k{k}")),
                        layers=None if layer is None else [layer], ks=None, sparse=replace(self.sparse, k=k))
                for layer in layers for k in ks]

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def _check_not_in_a_cache(out: str) -> None:
    """Refuse a run folder inside (or equal to) an activation cache."""
    path = Path(out).expanduser().resolve()
    for folder in (path, *path.parents):
        if (folder / MANIFEST).is_file():
            raise ValueError(f"out={out!r} is invalid: it is inside the activation cache {folder}; "
                             "choose a folder outside it")


def _same_config(existing, wanted, prefix: str = "") -> list[str]:
    """The dotted names of the fields in which two run configs (as dicts) differ, `out` and `resume`
    aside; path fields naming the same folder (relative, absolute, trailing slash) are equal."""
    if not (isinstance(existing, dict) and isinstance(wanted, dict)):
        return [] if existing == wanted else [prefix.rstrip(".")]
    diffs = []
    for key in sorted(set(existing) | set(wanted)):
        if not prefix and key in ("out", "resume"):
            continue
        a, b = existing.get(key, "<absent>"), wanted.get(key, "<absent>")
        if key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
            a, b = _path_key(a), _path_key(b)
        diffs += _same_config(a, b, f"{prefix}{key}.")
    return diffs


def config_differences(existing: dict, wanted: dict) -> list[str]:
    """The dotted fields in which a TrainConfig written earlier (maybe before some fields existed,
    which then count as their defaults) differs from `wanted`, `out` and `resume` aside."""
    return _same_config(_with_defaults(TrainConfig, existing), wanted)


def _path_key(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _with_defaults(cls, config: dict) -> dict:
    """`config` (a dataclass `cls` as a dict, maybe written before some of its fields existed) with
    the missing fields at their defaults."""
    full, hints = dict(config), typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            full[f.name] = _with_defaults(kind, config.get(f.name) or {})
        elif f.name not in config and f.default is not MISSING:
            full[f.name] = f.default
        elif f.name not in config and f.default_factory is not MISSING:
            full[f.name] = f.default_factory()
    return full


def reconstruction_loss(y_hat: Tensor, y: Tensor, kind: str = "nmse", denom: Tensor | None = None) -> Tensor:
    """nmse: Σ‖ŷ−y‖² / Σ‖y‖² over the batch; token_nmse: Σ_tokens ‖ŷ−y‖² / ‖y‖, over the token count.

    `denom` replaces the batch's own Σ‖y‖² (nmse) or token count (token_nmse): with the whole
    batch's denominator, the losses of a batch's shards sum to the batch's loss.
    """
    err = (y_hat.float() - y.float()).pow(2).sum(-1)  # [B]
    if kind == "nmse":
        return err.sum() / (y.float().pow(2).sum() if denom is None else denom).clamp_min(1e-12)
    return (err / y.float().norm(dim=-1).clamp_min(1e-6)).sum() / (len(y) if denom is None else denom)


def _aux_dead_loss(layer: SparseLayer, x: Tensor, residual: Tensor, dead: Tensor, k: int, all_sum) -> Tensor:
    """AuxK: how well the top-k dead latents alone reconstruct the residual y − ŷ.

    Only the dead latents' own parameters (router/encoder rows, modulators/decoder rows) get its
    gradient; MxD's shared decoder output Dᵀz is held fixed.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if isinstance(layer, MxD):
        logits = layer.router.logits(x, dead_idx)  # [B, n_dead]
    else:
        logits = torch.nn.functional.linear(x, layer.encoder.weight[dead_idx], layer.encoder.bias[dead_idx])
    values, pos = logits.topk(min(k, len(dead_idx)), dim=-1)
    indices, values = dead_idx[pos], values.relu()
    if isinstance(layer, MxD):
        out = layer.decoder(layer.hidden(x)).detach() * sparse_decode(indices, values, layer.modulators)
    else:
        out = sparse_decode(indices, values, layer.decoder)
    residual = residual.detach().float()
    return reconstruction_loss(out, residual, denom=all_sum(residual.pow(2).sum()))


def _balance_loss(codes: SparseCodes, n: int, all_sum) -> Tensor:
    """Switch-style N · Σ_n f_n p_n: f_n the share of routing slots, p_n the share of coefficient mass."""
    flat = codes.indices.flatten()
    slots = all_sum(torch.zeros(n, device=flat.device).index_add_(0, flat, torch.ones(len(flat), device=flat.device)))
    v = codes.values.float()
    mass = torch.zeros(n, device=v.device).index_add(0, flat, (v / v.sum(-1, keepdim=True).clamp_min(1e-9)).flatten())
    tokens = all_sum(torch.tensor(float(len(v)), device=v.device))
    return n * (slots / slots.sum() * mass / tokens).sum()


def _clip_grad_norm_(layer: SparseLayer, max_norm: float) -> None:
    """Scale the gradients to total norm `max_norm` if they exceed it; unlike clip_grad_norm_, no pass
    over them (the size of the layer) when they do not."""
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))


class Trainer:
    """Trains `config.sparse` on one layer; see the module docstring for what a run folder holds.

    Under torchrun (an initialised process group) the ranks train one layer together unless
    `distributed=False`: each takes an equal share of every batch, the losses are normalised by the
    whole batch's denominators and gradients are summed across ranks, so the result equals a
    one-process run with the same batch up to floating-point summation order. Only rank 0 writes.
    """

    def __init__(self, config: TrainConfig, progress: bool = True, distributed: bool | None = None,
                 model=None, tokenizer=None):
        if len(config.runs()) > 1:
            raise ValueError(f"the config names {len(config.runs())} runs (layers x ks); train them with train_runs")
        self.cfg = config = config.with_method_defaults()
        self.progress = progress
        rank, world = rank_and_world()
        self.sync = world > 1 and distributed is not False
        self.rank, self.world = (rank, world) if self.sync else (0, 1)
        self.writes = self.rank == 0
        if config.batch_tokens % self.world:
            raise ValueError(f"batch_tokens={config.batch_tokens} does not divide across {self.world} ranks")
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if config.device == "cuda" else config.device)
        self.out = Path(config.out)
        self.val = self.cache = None
        if config.cache is not None:
            d_in, d_out, host = self._open_caches()
        else:
            d_in, d_out, host = self._open_stream(model, tokenizer)
        self._check_out()
        torch.manual_seed(config.seed)
        self.layer = config.sparse.build(d_in, d_out, host).to(self.device)
        self.optim = optim = config.optim.resolved(config.sparse.kind)
        self.lr = (optim.lr or default_lr(optim.optimizer, config.sparse.kind, self.layer.n_latents)) * optim.lr_scale
        self.aux_k = d_out // 2 if config.aux_k is None else config.aux_k
        self.opt = make_optimizer(optim, self.layer.parameters(), self.lr)
        self.schedule_free = hasattr(self.opt, "eval")  # its parameters hold the training point; eval() swaps in the average
        self.sched = torch.optim.lr_scheduler.LambdaLR(getattr(self.opt, "base", self.opt),
                                                       lambda s: optim.lr_factor(s, config.steps))
        self.step = 0
        self.best_val = math.inf
        self.last_fired = torch.zeros(self.layer.n_latents, dtype=torch.long, device=self.device)  # tokens seen at last firing
        damaged = self._load_checkpoint() if config.resume else []
        self._barrier()  # every rank has checked everything before rank 0 writes
        if self.writes:
            self._write_out(damaged)

    # --- data ----------------------------------------------------------------------------------

    def _open_caches(self) -> tuple[int, int, dict]:
        cfg = self.cfg
        self.cache = ActivationCache(cfg.cache, allow_partial=cfg.allow_partial)
        model = self.cache.manifest["model"]
        self.layer_index = cfg.layers[0] if cfg.layers else self.cache.layers[0]
        self.cache.check_matches(model, self.layer_index)
        if cfg.val_cache:
            self.val = ActivationCache(cfg.val_cache, allow_partial=cfg.allow_partial)
            self.val.check_matches(model, self.layer_index)
            if self.val.manifest["split"] == self.cache.manifest["split"] and self.val.manifest["data"] == self.cache.manifest["data"]:
                raise ValueError(f"val_cache {cfg.val_cache} holds the same split of the same data as the training cache")
        m = self.cache.manifest
        return m["d_in"], m["d_out"], m["host_mlp"]

    def _open_stream(self, model, tokenizer) -> tuple[int, int, dict]:
        cfg = self.cfg
        if model is None:
            model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.model_dtype], device=self.device)
        self.model, self.tokenizer = model, tokenizer
        self.layer_index = cfg.layers[0]
        check_context_len(model, cfg.data.context_len)
        self.site = find_mlp(model, self.layer_index, cfg.module_path)
        d_in, d_out = site_dims(model, self.site)
        if cfg.val_cache:
            self.val = ActivationCache(cfg.val_cache, allow_partial=cfg.allow_partial)
            self.val.check_matches(cfg.model, self.layer_index)
        else:  # hold val_tokens of the validation split in memory
            val = list(islice(self._stream("validation", 4096, seed=0), math.ceil(cfg.val_tokens / 4096)))
            if not val:
                raise ValueError(f"the validation split of source {cfg.data.source!r} gives fewer than 4096 tokens")
            self.val_batches = val
        return d_in, d_out, host_mlp(model, self.site)

    def _stream(self, split: str, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        return stream_activations(self.model, self.tokenizer, self.site, self.cfg.data, split, batch_size=batch_size,
                                  buffer_tokens=self.cfg.buffer_tokens, seed=seed, progress=False, shard=shard)

    def _batches(self):
        """This rank's share (x, y) of every batch from the current step on, epoch after epoch."""
        cfg, share = self.cfg, self.cfg.batch_tokens // self.world
        if self.cache is None:  # resuming replays the stream up to the current step
            yield from islice(self._stream_epochs(), self.step, None)
            return
        per_epoch = self.cache.n_tokens // cfg.batch_tokens
        if per_epoch == 0:
            raise ValueError(f"batch_tokens={cfg.batch_tokens} exceeds the cache's {self.cache.n_tokens} tokens")
        step = self.step
        while True:
            epoch, start = divmod(step, per_epoch)
            for x, y in self.cache.batches(self.layer_index, cfg.batch_tokens, seed=cfg.seed, epoch=epoch, start=start):
                if len(x) < cfg.batch_tokens:
                    break
                rows = slice(self.rank * share, (self.rank + 1) * share)
                yield x[rows], y[rows]
                step += 1

    def _stream_epochs(self):
        """Streamed batches, epoch after epoch; rank r reads its own share of the documents (blocks r mod world)."""
        share = self.cfg.batch_tokens // self.world
        for epoch in count():
            served = 0
            for batch in self._stream("train", share, seed=self.cfg.seed * 1_000_003 + epoch, shard=(self.rank, self.world)):
                served += 1
                yield batch
            if not served:
                raise ValueError(f"source {self.cfg.data.source!r} gives fewer than batch_tokens={self.cfg.batch_tokens} tokens")

    def _val_iter(self):
        """Full validation batches (x, y), up to 4096 rows each."""
        if self.val is not None:
            return self.val.batches(self.layer_index, 4096, shuffle=False)
        return iter(self.val_batches)

    # --- collectives ---------------------------------------------------------------------------

    def _all_sum(self, t: Tensor) -> Tensor:
        """Sum of a (non-differentiable) tensor over the ranks training this layer."""
        t = t.detach().clone()
        if self.sync:
            dist.all_reduce(t)
        return t

    def _sum_gradients(self) -> None:
        params = list(self.layer.parameters())
        flat = self._all_sum(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    def _barrier(self) -> None:
        if self.sync:
            dist.barrier()

    # --- run folder ----------------------------------------------------------------------------

    def _check_out(self) -> None:
        """Refuse a folder that holds another run, or (resuming) none or one with a different config."""
        config_path = self.out / "config.json"
        if config_path.exists():
            if not self.cfg.resume:
                raise ValueError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            diffs = config_differences(read_json(config_path), self.cfg.to_dict())
            if diffs:
                raise ValueError(f"cannot resume {self.out} with a different config (differs in: {', '.join(diffs)})")
        elif self.cfg.resume:
            raise ValueError(f"nothing to resume: {self.out} holds no run")

    def _write_out(self, damaged: list[Path]) -> None:
        """Create the run folder with its config.json (a new run); set damaged checkpoints aside."""
        config_path = self.out / "config.json"
        if not config_path.exists():
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(config_path, self.cfg.to_dict() | {"resume": False})
        for path in damaged:
            os.replace(path, path.with_name(f"damaged-{path.name}"))
        for stale in [*self.out.glob(".final.tmp-*"), *self.out.glob("checkpoints/.step-*.tmp-*")]:  # left by a kill
            shutil.rmtree(stale, ignore_errors=True)

    # --- checkpoints ---------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        folder = self.out / "checkpoints"
        found = [p for p in folder.glob("step-*") if (p / "state.json").exists()] if folder.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def _kept(self) -> str:
        """Which checkpoint a stopped run can resume from."""
        checkpoints = self._checkpoints()
        return (f"the last good checkpoint, {checkpoints[-1]}, is kept" if checkpoints
                else "no checkpoint was written yet")

    def save_checkpoint(self, is_best: bool = False) -> Path:
        if not all(torch.isfinite(p).all() for p in self.layer.parameters()):
            raise TrainingDiverged(f"non-finite weights at step {self.step}; {self._kept()}")
        folder = self.out / "checkpoints"
        final = folder / f"step-{self.step}"
        if not self.writes:
            return final
        opt_state = self.opt.state_dict()

        def write(tmp: Path) -> None:
            self.layer.save(tmp / "layer")
            tensors = {f"{i}.{k}": v.cpu() for i, s in opt_state["state"].items() for k, v in s.items()}
            tensors |= {"rng": torch.get_rng_state(), "last_fired": self.last_fired.cpu()}
            save_tensors(tensors, tmp / "trainer.safetensors")
            state = {"step": self.step, "best_val": self.best_val, "param_groups": opt_state["param_groups"],
                     "scheduler": self.sched.state_dict(), "is_best": is_best,
                     "sha256": {name: sha256(tmp / name) for name in CHECKPOINT_FILES}}
            write_json_atomic(tmp / "state.json", state)

        folder.mkdir(parents=True, exist_ok=True)
        write_folder_atomic(final, write)
        checkpoints = self._checkpoints()
        best = [p for p in checkpoints if read_json(p / "state.json").get("is_best")]
        keep = set(checkpoints[-self.cfg.keep_last :]) | set(best[-1:])
        for old in checkpoints:
            if old not in keep:
                shutil.rmtree(old)
        return final

    def _read_checkpoint(self, path: Path) -> tuple[SparseLayer, dict, dict]:
        """(layer, trainer tensors, state) of a checkpoint, after checking its checksums and that it
        holds finite numbers; DamagedFileError (or another ValueError / OSError) when it does not."""
        state = read_json(path / "state.json")
        if not isinstance(state, dict) or state.get("step") != int(path.name.split("-")[1]):
            raise DamagedFileError(f"{path / 'state.json'}: its step does not match the folder name")
        for name, digest in state.get("sha256", {}).items():  # checkpoints from before checksums have none
            if name not in CHECKPOINT_FILES:
                raise DamagedFileError(f"{path / 'state.json'}: lists an unknown file {name!r}")
            check_sha256(path / name, digest, "this checkpoint cannot be used")
        layer = load(path / "layer", device=self.device)
        tensors = load_tensors(path / "trainer.safetensors", self.device)
        numbers = [*layer.state_dict().values(), *(t for t in tensors.values() if t.is_floating_point())]
        if not all(torch.isfinite(t).all() for t in numbers):
            raise DamagedFileError(f"{path}: holds non-finite (NaN/Inf) weights or optimiser state")
        return layer, tensors, state

    def _load_checkpoint(self) -> list[Path]:
        """Continue from the newest intact checkpoint; the damaged newer ones, to be set aside (a
        run with none continues from the start; a run whose every checkpoint is damaged is refused)."""
        checkpoints = self._checkpoints()
        damaged = []
        for path in reversed(checkpoints):
            try:
                layer, tensors, state = self._read_checkpoint(path)
                break
            except (ValueError, OSError, KeyError) as e:
                log.warning(f"mxd train: checkpoint {path} is damaged ({' '.join(str(e).split())}); "
                            f"it is renamed damaged-{path.name} and an older one is used")
                damaged.append(path)
        else:
            if damaged:
                raise ValueError(f"every checkpoint of {self.out} is damaged ({', '.join(p.name for p in damaged)}; "
                                 "see the warnings above); move them away to train this run from the start")
            return []  # the run stopped before its first checkpoint: start over
        self.layer.load_state_dict(layer.state_dict())
        opt_state = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            if key[0].isdigit():
                i, name = key.split(".", 1)
                opt_state["state"].setdefault(int(i), {})[name] = value
        self.opt.load_state_dict(opt_state)
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng"].cpu())
        self.last_fired = tensors["last_fired"]
        self.step, self.best_val = state["step"], state["best_val"]
        return damaged

    # --- training ------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16")

    def _train_step(self, x: Tensor, y: Tensor) -> dict:
        """One optimiser step on this rank's share [b, d] of the batch; returns the whole batch's stats."""
        cfg = self.cfg
        x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
        tokens_seen = (self.step + 1) * cfg.batch_tokens
        dead = (tokens_seen - self.last_fired) > cfg.dead_window  # [N], the same on every rank
        sq, n = self._all_sum(torch.stack([y.pow(2).sum(), torch.tensor(float(len(y)), device=self.device)]))
        if self.step == 0 and cfg.data_init:
            self.layer.init_from_means_(self._all_sum(x.sum(0)) / n, self._all_sum(y.sum(0)) / n)
        with self._autocast():
            y_hat, codes = self.layer(x)
            loss = reconstruction_loss(y_hat, y, cfg.loss, sq if cfg.loss == "nmse" else n)
            total = loss
            if cfg.sparse.sparsity == "l1" and cfg.sparse.kind != "mxd":
                total = total + cfg.sparse.l1_coef * self.layer.l1_penalty(codes) * len(y) / n
            if self.aux_k and dead.any():
                total = total + cfg.aux_coef * _aux_dead_loss(self.layer, x, y - y_hat.float(), dead, self.aux_k, self._all_sum)
            if cfg.balance_coef:
                total = total + cfg.balance_coef * _balance_loss(codes, self.layer.n_latents, self._all_sum)
        active = codes.values != 0
        n_latents = self.layer.n_latents
        fired = torch.zeros(n_latents, device=self.device).index_fill_(0, codes.indices[active], 1.0)
        chosen = torch.bincount(codes.indices.flatten(), minlength=n_latents).float()  # slots per latent
        err = (y_hat.float() - y).pow(2).sum()
        summed = self._all_sum(torch.cat([torch.stack([loss, total, err, active.sum().float()]).float(), fired, chosen]))
        loss_all, total_all, err_all, active_all = summed[:4].tolist()
        fired, chosen = summed[4 : 4 + n_latents], summed[4 + n_latents :]
        if not math.isfinite(total_all):
            raise TrainingDiverged(f"the loss became {total_all} at step {self.step}"
                                   f"{self._bad_data('training', self.cache, [(x, y)])}; {self._kept()}")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.sync:
            self._sum_gradients()
        self.layer.project_gradients_()
        if self.optim.grad_clip:
            _clip_grad_norm_(self.layer, self.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.layer.normalize_weights_()
        self.layer.balance_(chosen, int(n.item()), dead)
        self.last_fired[fired > 0] = tokens_seen
        return {"loss": loss_all, "nmse": err_all / max(sq.item(), 1e-12), "l0": active_all / n.item(),
                "dead": dead.float().mean().item() if tokens_seen > cfg.dead_window else None}

    @contextmanager
    def _averaged(self):
        """A schedule-free optimiser's averaged parameters in place of the training point, for evaluation and saving."""
        if self.schedule_free:
            self.opt.eval()
        try:
            yield
        finally:
            if self.schedule_free:
                self.opt.train()

    def _bad_data(self, role: str, cache: ActivationCache | None, batches) -> str:
        """For a divergence message: where the NaN/Inf comes from when the (x, y) `batches` of the
        `role` data hold one (the chunks of `cache` that do, or the model that was streamed), else ""."""
        if all(torch.isfinite(x).all() and torch.isfinite(y).all() for x, y in batches):
            return ""
        if cache is None:
            return f": the {role} activations streamed from the model hold NaN/Inf"
        return (f": the {role} cache {cache.path} holds NaN/Inf in "
                f"{', '.join(cache.nonfinite_chunks(self.layer_index)) or 'its data'}; harvest it again")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation nmse, fvu, l0 and dead (share of latents that never fired) over val_tokens tokens,
        of the averaged parameters when the optimiser is schedule-free."""
        with self._averaged():
            return self._evaluate()

    def _evaluate(self) -> dict:
        d_out = self.layer.config.d_out
        sums = torch.zeros(2 + d_out + self.layer.n_latents, dtype=torch.float64, device=self.device)  # err, Σy², Σy, fired
        n = 0
        for x, y in self._val_iter():
            n += len(y)
            x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]  # this rank's rows
            if len(y):
                with self._autocast():
                    y_hat, codes = self.layer(x.to(self.device, torch.float32))
                y = y.to(self.device, torch.float64)
                sums[0] += (y_hat.double() - y).pow(2).sum()
                sums[1] += y.pow(2).sum()
                sums[2 : 2 + d_out] += y.sum(0)
                sums[2 + d_out :].index_add_(0, codes.indices[codes.values != 0], torch.ones((), dtype=torch.float64,
                                             device=self.device).expand(int((codes.values != 0).sum())))
            if n >= self.cfg.val_tokens:
                break
        sums = self._all_sum(sums)
        err, sq = sums[:2].tolist()
        var = sq - sums[2 : 2 + d_out].pow(2).sum().item() / n
        firing = firing_metrics(sums[2 + d_out :], n)
        return {"val_nmse": err / sq, "val_fvu": err / var} | {f"val_{k}": v for k, v in firing.items()}

    def train(self) -> SparseLayer:
        cfg = self.cfg
        logger = MetricsLogger(self.out, cfg.log_to, cfg.to_dict()) if self.writes else None
        bar = tqdm(total=cfg.steps * cfg.batch_tokens, initial=self.step * cfg.batch_tokens, unit="tok",
                   unit_scale=True, desc=f"{cfg.sparse.kind} layer {self.layer_index} k={cfg.sparse.k}",
                   disable=not (self.progress and self.writes))
        start_time, start_step = time.perf_counter(), self.step
        batches = self._batches()
        interrupted = []
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if in_main else None  # finish the step first
        postfix = {}
        try:
            while self.step < cfg.steps:
                if self._all_sum(torch.tensor(float(bool(interrupted)))).item():  # any rank interrupted
                    self.save_checkpoint()
                    raise KeyboardInterrupt
                x, y = next(batches)
                stats = self._train_step(x, y)
                self.step += 1
                dead = "n/a" if stats["dead"] is None else f"{100 * stats['dead']:.1f}%"  # n/a: run shorter than the window
                postfix |= {"loss": f"{stats['loss']:.4f}", "nmse": f"{stats['nmse']:.4f}", "l0": f"{stats['l0']:.1f}",
                            "dead": dead}
                bar.update(cfg.batch_tokens)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    rate = (self.step - start_step) * cfg.batch_tokens / (time.perf_counter() - start_time)
                    if logger:
                        logger.log({"step": self.step, "tokens": self.step * cfg.batch_tokens,
                                    "lr": self.sched.get_last_lr()[0], "tokens_per_s": rate, "ranks": self.world, **stats})
                    bar.set_postfix(postfix)
                is_best = False
                if self.val is not None or self.cache is None:
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        metrics = self.evaluate()
                        if not math.isfinite(metrics["val_nmse"]):
                            raise TrainingDiverged(f"the validation nmse became {metrics['val_nmse']} at step "
                                                   f"{self.step}{self._bad_data('validation', self.val, self._val_iter())}; {self._kept()}")
                        if logger:
                            logger.log({"step": self.step, "tokens": self.step * cfg.batch_tokens, **metrics})
                        postfix["val_nmse"] = f"{metrics['val_nmse']:.4f}"
                        bar.set_postfix(postfix)
                        is_best = metrics["val_nmse"] < self.best_val
                        self.best_val = min(self.best_val, metrics["val_nmse"])
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or is_best:
                    self.save_checkpoint(is_best)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
            bar.close()
            if logger:
                logger.close()
        if self.writes:
            with self._averaged():
                write_folder_atomic(self.out / "final", self.layer.save)
        self._barrier()
        return self.layer


def train_runs(config: TrainConfig, progress: bool = True) -> list[Path]:
    """Train every run of `config` (one per layer and K); returns the run folders this process trained.

    Under torchrun, placement "replicate" trains each run on all ranks together and "spread" gives
    run i to rank i mod world size alone.
    """
    runs = config.runs()
    rank, world = rank_and_world()
    mine = runs[rank::world] if config.placement == "spread" else runs
    for run in mine:
        Trainer(run, progress=progress, distributed=config.placement == "replicate").train()
    return [Path(run.out) for run in mine]
