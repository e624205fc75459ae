"""Sparse layers that stand in for a dense MLP: MxD, TopK/ReLU transcoders and skip transcoders.

All share one interface (see `SparseLayer`): x [B, d_in] is the MLP's input, y_hat [B, d_out] the
estimate of its output, and `SparseCodes` the K active (expert or latent) indices and coefficients
per token.

MxD (Oldfield et al. 2025, arXiv 2505.21364), with N experts and hidden width H:

    z     = φ(E x + b_e)                      (GLU form: φ(E x + b_e) ⊙ (G x + b_g))    [B, H]
    a     = TopK_K(ReLU(W_r x + b_r))                                                    [B, N], K non-zeros
    y_hat = (Dᵀ z) ⊙ (C a) + b                                                           [B, d_out]

Expert n is the full-rank map W_n = D diag(c_n) ∈ R^{H×d_out}; Σ_n a_n W_nᵀ z = (Dᵀ z) ⊙ (C a).
Storage: `decoder.weight` is Dᵀ [d_out, H]; `modulators` holds C transposed, one row c_n per expert
[N, d_out], so that `C a` is a gather of K rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mxd.files import DamagedFileError, check_sha256, load_tensors, read_json, save_tensors, sha256, write_json_atomic
from mxd.routing import FlatRouter, ProductKeyRouter, product_grid
from mxd.sparse_ops import compute_dtype, sparse_decode, topk_linear

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}
SPARSITIES = ("topk", "l1")
COEFFICIENTS = ("relu", "signed")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class SparseCodes(NamedTuple):
    """K active latents per token: indices [B, K] int64 and their coefficients values [B, K]."""

    indices: Tensor
    values: Tensor

    def to_dense(self, n_latents: int) -> Tensor:
        """The codes scattered into a dense [B, n_latents] tensor."""
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter(-1, self.indices, self.values)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")


def _check_choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid: valid values are {', '.join(map(repr, valid))}")


@dataclass
class LayerConfig:
    """Base of the layer configs: JSON round-trip with a clear error on unknown keys."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


@dataclass
class MxDConfig(LayerConfig):
    """Sizes and options of an MxD layer.

    d_in, d_out: the MLP's input/output widths; d_hidden: H, the host MLP's hidden width;
    n_experts: N (0, with k = 0 and a shared modulator: the dense-only reference, no experts);
    k: active experts per token; activation: φ; glu: GLU encoder (Llama-style SwiGLU when
    activation="silu"); bias: encoder and output biases (the router always has one);
    unit_norm_modulators: keep each c_n at unit norm (the paper's option);
    decoder_init_std: std of D's normal init (0 gives the paper's zero init); router: "flat"
    (W_r x over all N experts) or "product_key" (two sub-routers over ≈√N sub-keys each, see
    mxd.routing); router_candidates: rows/columns a product-key router keeps (0: K, exact; fewer is
    cheaper and approximate); shared_modulator: a learned modulator c0 (initialised to ones) that
    every token uses besides its experts, so the modulation is c0 + C a; linear_modulation: a dense
    input-dependent modulation W_m x (W_m [d_out, d_in], initialised at zero) added to it;
    balance_rate: step by which a flat router's selection bias evens out how often experts are
    chosen (0: off); balance_cap: 0 to move every expert toward equal load, or a share of tokens:
    then only experts chosen more often than that are pushed down, and dead ones up; coefficients: "relu" (a = TopK(ReLU(logits)), the paper's) or "signed" (the
    chosen logits themselves, so every chosen expert contributes); modulator_init: "uniform"
    (c_n ~ U(-1, 1), the paper's) or "zero" (the experts start silent: with a shared modulator the
    layer starts as its dense path)
    """

    d_in: int
    d_out: int
    d_hidden: int
    n_experts: int
    k: int
    activation: str = "silu"
    glu: bool = True
    bias: bool = True
    unit_norm_modulators: bool = False
    decoder_init_std: float = 0.01
    router: str = "flat"
    router_candidates: int = 0
    shared_modulator: bool = False
    linear_modulation: bool = False
    balance_rate: float = 0.0
    balance_cap: float = 0.0
    coefficients: str = "relu"
    modulator_init: str = "uniform"

    def __post_init__(self):
        _check_positive(d_in=self.d_in, d_out=self.d_out, d_hidden=self.d_hidden)
        if self.n_experts == 0 and self.k == 0:
            if not self.shared_modulator:
                raise ValueError("n_experts=0, k=0 (the dense-only reference) needs shared_modulator=True")
        else:
            _check_positive(n_experts=self.n_experts, k=self.k)
        if self.k > self.n_experts:
            raise ValueError(f"k={self.k} is invalid: must be between 1 and n_experts={self.n_experts}")
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("router", self.router, ("flat", "product_key"))
        _check_choice("coefficients", self.coefficients, COEFFICIENTS)
        _check_choice("modulator_init", self.modulator_init, ("uniform", "zero"))
        if self.modulator_init == "zero" and self.unit_norm_modulators:
            raise ValueError("modulator_init='zero' is invalid with unit_norm_modulators: zero rows have no direction")
        if self.decoder_init_std < 0:
            raise ValueError(f"decoder_init_std={self.decoder_init_std} is invalid: must be >= 0")
        if self.router_candidates < 0:
            raise ValueError(f"router_candidates={self.router_candidates} is invalid: must be >= 0 (0 means k)")
        if not 0 <= self.balance_cap < 1:
            raise ValueError(f"balance_cap={self.balance_cap} is invalid: must be in [0, 1) (0: toward equal load)")
        if not self.balance_rate >= 0:
            raise ValueError(f"balance_rate={self.balance_rate} is invalid: must be >= 0 (0: off)")
        if self.balance_cap and self.router != "flat":
            raise ValueError(f"balance_cap={self.balance_cap} is invalid with router={self.router!r}: bounded "
                             "balancing is implemented for the flat router only (use 0: toward equal load)")
        if self.router == "product_key" and self.n_experts:
            product_grid(self.n_experts)  # raises for an N without a near-square factorisation

    def param_count(self) -> int:
        """Parameters: base (encoder, decoder, biases, c0) + N d_out (modulators) + the router's."""
        if self.router == "flat":
            router = self.n_experts * (self.d_in + 1)
        else:
            router = sum(product_grid(self.n_experts)) * (self.d_in + 1) if self.n_experts else 0
        base = mxd_base_params(self.d_in, self.d_out, self.d_hidden, self.glu, self.bias)
        dense = self.d_out * self.shared_modulator + self.d_in * self.d_out * self.linear_modulation
        return base + dense + self.n_experts * self.d_out + router


@dataclass
class TranscoderConfig(LayerConfig):
    """Sizes and options of a transcoder.

    width: M latents; k: active latents per token (sparsity="topk"); sparsity: "topk" or "l1"
    (ReLU latents, sparsity by an L1 penalty during training, k unused); unit_norm_decoder: keep
    each decoder row at unit norm; decoder_init: "zero" (the standard transcoder init of
    EleutherAI's sparsify) or "uniform" (nn.Linear's U(±1/√M))
    """

    d_in: int
    d_out: int
    width: int
    k: int
    sparsity: str = "topk"
    unit_norm_decoder: bool = False
    decoder_init: str = "zero"

    def __post_init__(self):
        _check_positive(d_in=self.d_in, d_out=self.d_out, width=self.width, k=self.k)
        if self.k > self.width:
            raise ValueError(f"k={self.k} is invalid: must be between 1 and width={self.width}")
        _check_choice("sparsity", self.sparsity, SPARSITIES)
        _check_choice("decoder_init", self.decoder_init, ("zero", "uniform"))
        if self.decoder_init == "zero" and self.unit_norm_decoder:
            raise ValueError("decoder_init='zero' is invalid with unit_norm_decoder: zero rows have no direction; "
                             "use decoder_init='uniform'")

    def param_count(self, skip: bool = False) -> int:
        """M (d_in + d_out) + M + d_out, plus d_in · d_out for the skip connection."""
        return self.width * (self.d_in + self.d_out + 1) + self.d_out + (self.d_in * self.d_out if skip else 0)


def mxd_base_params(d_in: int, d_out: int, d_hidden: int, glu: bool, bias: bool = True) -> int:
    """MxD parameters that do not scale with N: encoder(s), shared decoder and biases."""
    n_enc = 2 if glu else 1
    return d_hidden * d_in * n_enc + d_hidden * d_out + (d_hidden * n_enc + d_out if bias else 0)


def match_n_experts(d_in: int, d_out: int, d_hidden: int, transcoder_width: int, glu: bool, bias: bool = True,
                    extra: int = 0) -> int:
    """The expert count N giving an MxD (with `extra` parameters besides its base, e.g. c0) as many
    parameters as a TopK transcoder of width M.

    GPT-2 (768, 768, H=3072, M=32·768, MLP form) gives 21,504.
    """
    _check_positive(d_in=d_in, d_out=d_out, d_hidden=d_hidden, transcoder_width=transcoder_width)
    target = TranscoderConfig(d_in, d_out, transcoder_width, 1).param_count()
    n = round((target - mxd_base_params(d_in, d_out, d_hidden, glu, bias) - extra) / (d_in + d_out + 1))
    if n < 1:
        raise ValueError(
            f"transcoder_width={transcoder_width} is too small: an MxD with d_hidden={d_hidden} has more "
            "parameters before its first expert; use a larger width"
        )
    return n


def match_skip_width(d_in: int, d_out: int, transcoder_width: int) -> int:
    """The width of a skip transcoder with as many parameters as a TopK transcoder of width M (its
    d_in × d_out skip matrix is paid for with latents)."""
    width = round((TranscoderConfig(d_in, d_out, transcoder_width, 1).param_count()
                   - d_in * d_out - d_out) / (d_in + d_out + 1))
    if width < 1:
        raise ValueError(f"transcoder_width={transcoder_width} is too small to pay for a {d_in} x {d_out} skip matrix")
    return width


class SparseLayer(nn.Module):
    """Interface shared by all sparse layers.

    encode(x) -> SparseCodes; decode(codes, x) -> y_hat; forward(x) -> (y_hat, codes).
    `unit_norm_weight` names the parameter whose rows are kept at unit norm (or None); the trainer
    calls `init_from_means_` before the first step, `project_gradients_()` before and
    `normalize_weights_()` and `balance_` after each optimiser step.
    """

    config_class: ClassVar[type[LayerConfig]]
    config: LayerConfig

    @property
    def n_latents(self) -> int:
        raise NotImplementedError

    def encode(self, x: Tensor) -> SparseCodes:
        raise NotImplementedError

    def decode(self, codes: SparseCodes, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, SparseCodes]:
        codes = self.encode(x)
        return self.decode(codes, x), codes

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def unit_norm_weight(self) -> nn.Parameter | None:
        return None

    def init_from_means_(self, mean_x: Tensor, mean_y: Tensor) -> None:
        """Set biases from the mean input [d_in] and mean target [d_out] of the first batch (the
        trainer's data init); layers without such an init keep their parameters."""

    def balance_(self, counts: Tensor, tokens: int, dead: Tensor) -> None:
        """After an optimiser step: how often each latent was chosen in it [n_latents], among how
        many tokens, and which latents are dead [n_latents] bool (the trainer calls this; layers
        that do not balance ignore it)."""

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Rescale each row of `unit_norm_weight` to unit norm."""
        w = self.unit_norm_weight
        if w is not None:
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny))

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """Remove from each row's gradient its component parallel to the (unit-norm) row."""
        w = self.unit_norm_weight
        if w is not None and w.grad is not None:
            w.grad.sub_((w.grad * w).sum(dim=1, keepdim=True) * w)

    def save(self, directory: str | Path) -> None:
        """Write `model.safetensors` and `config.json` (class, config and the weights' SHA-256, which
        `load` verifies) into `directory` (created if missing), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_tensors(tensors, directory / WEIGHTS_FILE)
        meta = {"class": type(self).__name__, "config": self.config.to_dict(), "sha256": sha256(directory / WEIGHTS_FILE)}
        write_json_atomic(directory / CONFIG_FILE, meta)


def _uniform_linear_init_(weight: Tensor, fan_in: int) -> None:
    """nn.Linear's default init: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class MxD(SparseLayer):
    """Mixture of Decoders: N full-rank experts W_n = D diag(c_n), K active per token."""

    config_class = MxDConfig

    def __init__(self, config: MxDConfig):
        super().__init__()
        self.config = config
        c = config
        self.act = ACTIVATIONS[c.activation]
        self.encoder = nn.Linear(c.d_in, c.d_hidden, bias=c.bias)  # E, b_e (inside φ: Llama's gate_proj)
        self.up = nn.Linear(c.d_in, c.d_hidden, bias=c.bias) if c.glu else None  # G, b_g (Llama's up_proj)
        self.decoder = nn.Linear(c.d_hidden, c.d_out, bias=False)  # weight = Dᵀ [d_out, H]
        self.router = None
        rectify = c.coefficients == "relu"
        if c.n_experts and c.router == "flat":
            self.router = FlatRouter(c.d_in, c.n_experts, balanced=c.balance_rate > 0, rectify=rectify)  # W_r, b_r
        elif c.n_experts:
            self.router = ProductKeyRouter(c.d_in, c.n_experts, c.router_candidates, rectify=rectify,
                                           balanced=c.balance_rate > 0)
        self.modulators = nn.Parameter(torch.empty(c.n_experts, c.d_out)) if c.n_experts else None  # Cᵀ: row n is c_n
        self.shared = nn.Parameter(torch.ones(c.d_out)) if c.shared_modulator else None  # c0
        self.linear = nn.Linear(c.d_in, c.d_out, bias=False) if c.linear_modulation else None  # W_m
        self.bias = nn.Parameter(torch.zeros(c.d_out)) if c.bias else None  # b
        with torch.no_grad():
            nn.init.normal_(self.decoder.weight, std=c.decoder_init_std)
            if self.modulators is not None:
                nn.init.uniform_(self.modulators, -1.0, 1.0) if c.modulator_init == "uniform" else self.modulators.zero_()
            if self.linear is not None:
                self.linear.weight.zero_()
        if c.unit_norm_modulators:
            self.normalize_weights_()

    @property
    def n_latents(self) -> int:
        return self.config.n_experts

    @property
    def unit_norm_weight(self) -> nn.Parameter | None:
        return self.modulators if self.config.unit_norm_modulators and self.modulators is not None else None

    def hidden(self, x: Tensor) -> Tensor:
        """z = φ(E x + b_e) (⊙ (G x + b_g)).  [B, d_in] -> [B, H]."""
        z = self.act(self.encoder(x))
        return z * self.up(x) if self.up is not None else z

    def dense(self, x: Tensor) -> Tensor:
        """The shared decoder's output Dᵀ z, which the experts modulate.  [B, d_in] -> [B, d_out]."""
        return self.decoder(self.hidden(x))

    def encode(self, x: Tensor) -> SparseCodes:
        if self.router is None:  # the dense-only reference: no codes
            empty = x.new_empty(len(x), 0, dtype=compute_dtype(x, self.encoder.weight))
            return SparseCodes(empty.long(), empty)
        values, indices = self.router.topk(x, self.config.k)
        return SparseCodes(indices, values)

    def modulation(self, codes: SparseCodes, x: Tensor) -> Tensor:
        """C a, plus c0 and W_m x when the layer has them.  -> [B, d_out]."""
        parts = [sparse_decode(codes.indices, codes.values, self.modulators)] if self.router is not None else []
        if self.linear is not None:
            parts.append(self.linear(x))
        m = sum(parts[1:], parts[0]) if parts else None
        if self.shared is None:
            return m
        return self.shared.expand(len(x), -1) if m is None else m + self.shared

    def decode(self, codes: SparseCodes, x: Tensor) -> Tensor:
        y = self.dense(x) * self.modulation(codes, x)
        return y + self.bias if self.bias is not None else y

    def ablated(self, x: Tensor, keep: Tensor | None = None, modulation: Tensor | None = None) -> Tensor:
        """y_hat with only the experts in `keep` ([N] bool) used, or with the whole modulation
        (c0 + W_m x + C a) replaced by the fixed vector `modulation` [d_out].  [B, d_in] -> [B, d_out]."""
        if modulation is not None:
            m = modulation.to(x.dtype).expand(len(x), -1)
        else:
            codes = self.encode(x)
            m = self.modulation(SparseCodes(codes.indices, codes.values * keep[codes.indices]), x)
        y = self.dense(x) * m
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def init_from_means_(self, mean_x: Tensor, mean_y: Tensor) -> None:
        if self.bias is not None:
            self.bias.copy_(mean_y)

    def balance_(self, counts: Tensor, tokens: int, dead: Tensor) -> None:
        if self.config.balance_rate:
            self.router.balance_(counts, self.config.balance_rate, self.config.balance_cap, tokens, dead)

    def expert_weights(self, experts: Tensor) -> Tensor:
        """W_n = D diag(c_n) for the given expert indices.  [n] -> [n, H, d_out]."""
        d = self.decoder.weight.T  # [H, d_out]
        return d.unsqueeze(0) * self.modulators[experts].unsqueeze(1)

    @torch.no_grad()
    def expert_rank(self, experts: Tensor) -> Tensor:
        """Normalised rank, rank(W_n) / min(H, d_out), of the given experts.  [n] -> [n]."""
        w = self.expert_weights(experts).float()
        return torch.linalg.matrix_rank(w).float() / min(w.shape[1:])


class Transcoder(SparseLayer):
    """y_hat = W_d f + b with f = TopK_K(ReLU(W_e x + b_e)), or ReLU latents with an L1 penalty."""

    config_class = TranscoderConfig

    def __init__(self, config: TranscoderConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Linear(config.d_in, config.width)  # W_e, b_e
        self.decoder = nn.Parameter(torch.empty(config.width, config.d_out))  # W_dᵀ: row m is latent m's direction
        self.bias = nn.Parameter(torch.zeros(config.d_out))  # b
        with torch.no_grad():
            if config.decoder_init == "uniform":
                _uniform_linear_init_(self.decoder, config.width)
            else:
                self.decoder.zero_()
        if config.unit_norm_decoder:
            self.normalize_weights_()

    @property
    def n_latents(self) -> int:
        return self.config.width

    @property
    def unit_norm_weight(self) -> nn.Parameter | None:
        return self.decoder if self.config.unit_norm_decoder else None

    def encode(self, x: Tensor) -> SparseCodes:
        if self.config.sparsity == "topk":
            values, indices = topk_linear(x, self.encoder.weight, self.encoder.bias, self.config.k)
            return SparseCodes(indices, values)
        f = F.relu(self.encoder(x))  # [B, M]
        n_active = max(1, int((f > 0).sum(-1).max()))  # pad every token to the batch's largest count
        values, indices = f.topk(n_active, dim=-1, sorted=False)
        return SparseCodes(indices, values)

    def decode(self, codes: SparseCodes, x: Tensor) -> Tensor:
        return sparse_decode(codes.indices, codes.values, self.decoder) + self.bias

    @torch.no_grad()
    def init_from_means_(self, mean_x: Tensor, mean_y: Tensor) -> None:
        """b = mean y and b_e = −W_e mean x: the latents' pre-activations start centred."""
        self.bias.copy_(mean_y)
        self.encoder.bias.copy_(-self.encoder.weight @ mean_x)

    def l1_penalty(self, codes: SparseCodes) -> Tensor:
        """Mean over tokens of Σ_m f_m ‖W_d[m]‖ (the decoder-norm-weighted L1 of ReLU transcoders)."""
        norms = self.decoder.norm(dim=1)[codes.indices]  # [B, K]
        return (codes.values.abs() * norms).sum(-1).mean()


class SkipTranscoder(Transcoder):
    """A transcoder plus a linear skip connection W_s x (W_s initialised at zero)."""

    def __init__(self, config: TranscoderConfig):
        super().__init__(config)
        self.skip = nn.Linear(config.d_in, config.d_out, bias=False)  # W_s
        nn.init.zeros_(self.skip.weight)

    def decode(self, codes: SparseCodes, x: Tensor) -> Tensor:
        return super().decode(codes, x) + self.skip(x)


LAYER_CLASSES: dict[str, type[SparseLayer]] = {cls.__name__: cls for cls in (MxD, Transcoder, SkipTranscoder)}


def load(directory: str | Path, device: str | torch.device = "cpu") -> SparseLayer:
    """Load a layer written by `SparseLayer.save`; fails clearly on a foreign or damaged folder, and
    on weights that fail the checksum in config.json (layers saved before checksums have none)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a saved mxd layer")
    try:
        meta = read_json(config_path)
        class_name, config_dict = meta["class"], meta["config"]
    except (DamagedFileError, KeyError, TypeError) as e:
        reason = f"missing field {e}" if isinstance(e, KeyError) else str(e).removeprefix(f"{config_path}: ")
        raise DamagedFileError(f"{config_path} is not an mxd layer config ({reason})") from None
    if "sha256" in meta:
        check_sha256(weights_path, meta["sha256"], f"it does not hold the weights {config_path} was saved with")
    if class_name not in LAYER_CLASSES:
        raise ValueError(f"unknown layer class {class_name!r} in {config_path}; valid: {', '.join(LAYER_CLASSES)}")
    cls = LAYER_CLASSES[class_name]
    with torch.device("meta"):
        layer = cls(cls.config_class.from_dict(config_dict))
    tensors = load_tensors(weights_path, device)
    expected = layer.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)} "
                f"but {config_path} implies {tuple(t.shape)}"
            )
    layer.load_state_dict(tensors, assign=True)
    return layer
