"""A self-contained reader for a layer exported by `mxd export` (plain PyTorch and safetensors; no mxd).

    from mxd_layer import load_layer
    layer = load_layer(".")        # the folder holding config.json and model.safetensors
    y = layer(x)                   # x [..., d_in] -> y [..., d_out], what the host MLP would output

Layers (config.json's "class"):
  MxD:            y = (Dᵀ z) ⊙ (C a + c0 + W_m x) + b, z = φ(E x + b_e) ⊙ (G x + b_g) (GLU) or φ(E x + b_e);
                  a holds the K chosen experts' router logits (ReLU'd when coefficients = "relu"),
                  chosen by logits + selection bias; c0, W_m, b present when the layer has them.
  Transcoder:     y = W_dᵀ f + b, f = TopK_K(ReLU(W_e x + b_e)) (ReLU alone when sparsity = "l1").
  SkipTranscoder: a Transcoder plus W_s x.
This file is written by mxd next to the weights; its outputs equal mxd's own layer classes'.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu, "relu": F.relu}


def _topk(logits: torch.Tensor, k: int, selection_bias: torch.Tensor | None, rectify: bool) -> torch.Tensor:
    """The chosen logits scattered into a dense tensor, the rest zero.  [B, N] -> [B, N]."""
    chosen = (logits if selection_bias is None else logits + selection_bias).topk(k, dim=-1).indices
    values = logits.gather(-1, chosen)
    return torch.zeros_like(logits).scatter(-1, chosen, values.relu() if rectify else values)


class ExportedLayer(torch.nn.Module):
    """One exported layer: `config` is config.json's "config", `weights` its tensors."""

    def __init__(self, kind: str, config: dict, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.kind, self.config = kind, config
        for name, tensor in weights.items():
            self.register_buffer(name.replace(".", "__"), tensor)

    def _get(self, name: str) -> torch.Tensor | None:
        return getattr(self, name.replace(".", "__"), None)

    def _router_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, N], selection bias [N] or None) of the MxD router."""
        if self._get("router.weight") is not None:  # flat
            return F.linear(x, self._get("router.weight"), self._get("router.bias")), self._get("router.selection_bias")
        rows = F.linear(x, self._get("router.rows.weight"), self._get("router.rows.bias"))  # [B, n_rows]
        cols = F.linear(x, self._get("router.cols.weight"), self._get("router.cols.bias"))  # [B, n_cols]
        logits = (rows.unsqueeze(2) + cols.unsqueeze(1)).flatten(1)  # expert i · n_cols + j
        row_bias, col_bias = self._get("router.row_bias"), self._get("router.col_bias")
        bias = None if row_bias is None else (row_bias.unsqueeze(1) + col_bias.unsqueeze(0)).flatten()
        return logits, bias

    def _mxd(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        z = ACTIVATIONS[c["activation"]](F.linear(x, self._get("encoder.weight"), self._get("encoder.bias")))
        if c["glu"]:
            z = z * F.linear(x, self._get("up.weight"), self._get("up.bias"))
        dense = F.linear(z, self._get("decoder.weight"))  # [B, d_out]
        m = torch.zeros_like(dense)
        if c["n_experts"]:
            logits, selection_bias = self._router_logits(x)
            a = _topk(logits, c["k"], selection_bias, c.get("coefficients", "relu") == "relu")
            m = m + a @ self._get("modulators")  # [B, N] @ [N, d_out]
        if self._get("shared") is not None:
            m = m + self._get("shared")
        if self._get("linear.weight") is not None:
            m = m + F.linear(x, self._get("linear.weight"))
        y = dense * m
        return y + self._get("bias") if self._get("bias") is not None else y

    def _transcoder(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self._get("encoder.weight"), self._get("encoder.bias"))
        f = _topk(logits, self.config["k"], None, True) if self.config["sparsity"] == "topk" else logits.relu()
        y = f @ self._get("decoder") + self._get("bias")
        return y + F.linear(x, self._get("skip.weight")) if self.kind == "SkipTranscoder" else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> y [..., d_out], computed in fp32 and returned in x's dtype."""
        flat = x.reshape(-1, x.shape[-1]).float()
        y = self._mxd(flat) if self.kind == "MxD" else self._transcoder(flat)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def load_layer(folder: str | Path = ".") -> ExportedLayer:
    """The layer in `folder` (config.json + model.safetensors)."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    if meta["class"] not in ("MxD", "Transcoder", "SkipTranscoder"):
        raise ValueError(f"{folder / 'config.json'}: unknown layer class {meta['class']!r}")
    weights = {name: t.float() for name, t in load_file(str(folder / "model.safetensors")).items()}
    return ExportedLayer(meta["class"], meta["config"], weights).eval()
