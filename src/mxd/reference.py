"""Dense reference implementations: the top-k coefficients scattered into a dense [B, N] tensor, then
dense matmuls forward and backward (how the paper's code computes it). Tests compare the sparse
kernels against these; benchmarks measure the speed-up over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mxd.layers import MxD, SkipTranscoder, SparseLayer, Transcoder


def dense_topk_relu(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """TopK_K(ReLU(x Wᵀ + b)) as a dense tensor.  [B, d_in], [N, d_in], [N] -> [B, N]."""
    return _dense_topk(F.linear(x, weight, bias), k)


def _dense_topk(logits: Tensor, k: int) -> Tensor:
    """The top-k entries of each row, ReLU'd, the rest zero.  [B, N] -> [B, N]."""
    top, indices = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, indices, top.relu())


def dense_forward(layer: SparseLayer, x: Tensor) -> Tensor:
    """The layer's output computed densely from its own parameters.  [B, d_in] -> [B, d_out]."""
    if isinstance(layer, MxD):
        if layer.router is None:
            m = torch.zeros(len(x), layer.config.d_out, dtype=x.dtype, device=x.device)
        else:  # chosen by logits (+ β), weighted by the (rectified) logits
            logits = layer.router.logits(x)
            beta = layer.router.selection_bias if layer.config.balance_rate else 0
            chosen = (logits + beta).topk(layer.config.k, dim=-1).indices
            values = logits.gather(-1, chosen)
            a = torch.zeros_like(logits).scatter(-1, chosen, values.relu() if layer.config.coefficients == "relu" else values)
            m = a @ layer.modulators  # [B, N] @ [N, d_out]
        if layer.shared is not None:
            m = m + layer.shared
        if layer.linear is not None:
            m = m + x @ layer.linear.weight.T
        y = layer.decoder(layer.hidden(x)) * m
        return y + layer.bias if layer.bias is not None else y
    if isinstance(layer, Transcoder):
        if layer.config.sparsity == "topk":
            f = dense_topk_relu(x, layer.encoder.weight, layer.encoder.bias, layer.config.k)
        else:
            f = F.relu(layer.encoder(x))
        y = f @ layer.decoder + layer.bias
        return y + layer.skip(x) if isinstance(layer, SkipTranscoder) else y
    raise TypeError(f"no dense reference for {type(layer).__name__}")
