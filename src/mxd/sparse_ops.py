"""Sparse kernels with custom autograd: the two operations that make MxD and TopK layers cheap.

Both work on K (index, coefficient) pairs per token instead of a dense B×N tensor:

- `topk_linear(x, W, b, k)`: TopK_K(ReLU(x Wᵀ + b)). The forward needs the dense B×N logits
  (freed before returning); the backward touches only the K selected rows of W per token.
- `sparse_decode(indices, values, table)`: Σ_k values[:, k] · table[indices[:, k]], i.e. `C a` for
  MxD or `W_d f` for a transcoder, without a B×N by N×O matmul (embedding_bag forward, index_add
  backward).

The three primitives below are shared: the router's input gradient is a `gather_sum`, its weight
gradient a `scatter_outer`, and the decoder's gradients are the same two operations transposed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the elements of the [tokens, K, d] intermediates built in backward (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute in: the autocast dtype when autocast is on, else the promoted dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _token_chunks(n_tokens: int, k: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(1, k * width))
    for start in range(0, n_tokens, step):
        yield slice(start, min(start + step, n_tokens))


def gather_sum(indices: Tensor, coeffs: Tensor, table: Tensor) -> Tensor:
    """out[b] = Σ_k coeffs[b, k] · table[indices[b, k]].  [B, K], [B, K], [N, d] -> [B, d]."""
    return F.embedding_bag(indices, table, per_sample_weights=coeffs, mode="sum")


def gather_dot(indices: Tensor, vectors: Tensor, table: Tensor) -> Tensor:
    """out[b, k] = <vectors[b], table[indices[b, k]]>.  [B, K], [B, d], [N, d] -> [B, K]."""
    out = vectors.new_empty(indices.shape)
    for s in _token_chunks(*indices.shape, table.shape[1]):
        rows = table[indices[s]]  # [b, K, d]
        out[s] = torch.bmm(rows, vectors[s].unsqueeze(-1)).squeeze(-1)
    return out


def scatter_outer(indices: Tensor, coeffs: Tensor, vectors: Tensor, n_rows: int, dtype: torch.dtype) -> Tensor:
    """out[n] = Σ_{(b, k): indices[b, k] = n} coeffs[b, k] · vectors[b].  -> [n_rows, d] in `dtype`.

    Accumulates in `dtype` (the parameter's), so bf16 products still sum in fp32.
    """
    out = torch.zeros(n_rows, vectors.shape[1], dtype=dtype, device=vectors.device)
    for s in _token_chunks(*indices.shape, vectors.shape[1]):
        outer = coeffs[s].unsqueeze(-1) * vectors[s].unsqueeze(1)  # [b, K, d]
        out.index_add_(0, indices[s].reshape(-1), outer.reshape(-1, vectors.shape[1]).to(dtype))
    return out


class TopKLinear(torch.autograd.Function):
    """(values, indices) = TopK_K(ReLU(x Wᵀ + b)); gradients only through the K selected rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int):
        dtype = compute_dtype(x, weight)
        logits = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))  # [B, N]
        top, indices = logits.topk(k, dim=-1, sorted=False)
        del logits
        values = top.relu()
        ctx.save_for_backward(x, weight, indices, values)
        ctx.has_bias = bias is not None
        ctx.dtype = dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        x, weight, indices, values = ctx.saved_tensors
        dtype = ctx.dtype
        grad_logits = (grad_values * (values > 0)).to(dtype)  # [B, K]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_sum(indices, grad_logits, weight.to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = scatter_outer(indices, grad_logits, x.to(dtype), weight.shape[0], weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_bias.index_add_(0, indices.reshape(-1), grad_logits.reshape(-1).to(weight.dtype))
        return grad_x, grad_weight, grad_bias, None


class SparseDecode(torch.autograd.Function):
    """out = Σ_k values[:, k] · table[indices[:, k]]; backward gathers/scatters K rows per token."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, table: Tensor):
        dtype = compute_dtype(values, table)
        ctx.save_for_backward(indices, values, table)
        ctx.dtype = dtype
        return gather_sum(indices, values.to(dtype), table.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        indices, values, table = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        grad_values = grad_table = None
        if ctx.needs_input_grad[1]:
            grad_values = gather_dot(indices, grad_out, table.to(ctx.dtype)).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_table = scatter_outer(indices, values.to(ctx.dtype), grad_out, table.shape[0], table.dtype)
        return None, grad_values, grad_table


def topk_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """TopK_K(ReLU(x Wᵀ + b)).  x [B, d_in], weight [N, d_in], bias [N] -> values [B, K], indices [B, K]."""
    return TopKLinear.apply(x, weight, bias, k)


def sparse_decode(indices: Tensor, values: Tensor, table: Tensor) -> Tensor:
    """Σ_k values[:, k] · table[indices[:, k]].  [B, K] int64, [B, K], [N, d] -> [B, d]."""
    return SparseDecode.apply(indices, values, table)
