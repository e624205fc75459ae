"""Sparse kernels with custom autograd: the two operations that make MxD and TopK layers cheap.

Both work on K (index, coefficient) pairs per token instead of a dense B×N tensor:

- `topk_linear(x, W, b, k)`: TopK_K(ReLU(x Wᵀ + b)). The forward needs the dense logits, computed
  a block of tokens at a time so that no [B, N] tensor is ever held, and selects from each block with
  `row_topk`; the backward touches only the K selected rows of W per token.
- `sparse_decode(indices, values, table)`: Σ_k values[:, k] · table[indices[:, k]], i.e. `C a` for
  MxD or `W_d f` for a transcoder, without a B×N by N×O matmul.

The (index, coefficient) pairs are a sparse [B, N] matrix A with K entries per row, and every
gradient is a product with A or a product sampled at its pattern:

- `gather_sum`:    A v        (a gather of K rows per token: embedding_bag)
- `scatter_outer`: Aᵀ v       (CSR sparse × dense: each table row sums over the tokens that chose it)
- `gather_dot`:    (T vᵀ)|Aᵀ  (the dot products at A's K entries only: sampled_addmm)

so no [B, K, d] intermediate is built either. The last two walk Aᵀ, the pairs sorted by table row
(`sort_pairs`, one sort shared by both), so that each table row is read or written once while the
[B, d] vectors stay in cache. The sparse BLAS has no bf16 kernels: the backward computes in fp32
also under autocast (a small share of the FLOPs, and more accurate sums).
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the elements of the [tokens, N] logits block of `topk_linear`'s forward (64 MiB in fp32),
# which on CPU stays allocated between calls (see `_scratch`).
CHUNK_ELEMENTS = 1 << 24
# Columns per group in `row_topk`: each level of its prefilter shrinks the row this many times.
GROUP_SIZE = 8


class _ScratchBuffers(threading.local):
    def __init__(self):
        self.by_dtype: dict[torch.dtype, Tensor] = {}  # flat CPU tensors


_scratch_buffers = _ScratchBuffers()


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised [rows, cols] tensor; on CPU a view of a buffer kept per thread and dtype.

    CPU has no caching allocator: a fresh 64 MiB logits block is mmapped and page-faulted on every
    forward (~50 ms a step at N = 16,384 in fp32). The buffer grows to the largest block asked for,
    at most CHUNK_ELEMENTS elements unless one row is longer. Other devices allocate (CUDA's caching
    allocator already reuses memory).
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _scratch_buffers.by_dtype
    if dtype not in buffers or buffers[dtype].numel() < rows * cols:
        buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buffers[dtype][: rows * cols].view(rows, cols)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute in: the autocast dtype when autocast is on, else the promoted dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype`, or fp32 for 16-bit floats (no sparse BLAS kernels)."""
    return torch.promote_types(dtype, torch.float32)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from trusted parts, without torch's once-per-process "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row, unsorted.  [B, N] -> values [B, k], indices [B, k] int64.

    On CPU, torch.topk costs 1-2 ns an element and scalar work per row, so this filters first. The
    N columns form g = N // 8 groups of 8 strided columns {j, j + g, ..., j + 7g}. A group whose
    maximum is not among the k largest group maxima holds no top-k entry: k other groups each hold a
    larger or equal one. So the top-k of the 8k columns of the best k groups (and of the N mod 8
    leftover columns) is the top-k of the row; the best groups are the `row_topk` of the [B, g]
    maxima, one vectorised pass. Exact: tied entries may be picked at other indices than torch.topk
    picks, with the same values. Other devices use torch.topk (a radix select on CUDA).
    """
    n_tokens, n = scores.shape
    if scores.device.type != "cpu" or n < 4 * GROUP_SIZE * k:
        return torch.topk(scores, k, dim=-1, sorted=False)
    g = n // GROUP_SIZE
    group_max = scores[:, : g * GROUP_SIZE].view(n_tokens, GROUP_SIZE, g).amax(1)  # [B, g]
    best = row_topk(group_max, k)[1]  # [B, k] group ids
    candidates = (best.unsqueeze(-1) + torch.arange(0, g * GROUP_SIZE, g, device=scores.device)).flatten(1)  # [B, 8k]
    if n % GROUP_SIZE:
        leftover = torch.arange(g * GROUP_SIZE, n, device=scores.device).expand(n_tokens, -1)
        candidates = torch.cat([candidates, leftover], dim=1)
    values, picked = scores.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, picked)


def gather_sum(indices: Tensor, coeffs: Tensor, table: Tensor) -> Tensor:
    """out[b] = Σ_k coeffs[b, k] · table[indices[b, k]].  [B, K], [B, K], [N, d] -> [B, d]."""
    return F.embedding_bag(indices, table, per_sample_weights=coeffs.to(table.dtype), mode="sum")


class SortedPairs(NamedTuple):
    """The B·K (token, row) pairs of a [B, K] index tensor sorted by row: the CSR structure of Aᵀ."""

    crow: Tensor  # [n_rows + 1] int64: row n's pairs are crow[n]:crow[n + 1]
    tokens: Tensor  # [B·K] int64: the token of each sorted pair
    order: Tensor  # [B·K] int64: each sorted pair's position in indices.flatten()
    shape: tuple[int, int]  # (n_rows, B)


def sort_pairs(indices: Tensor, n_rows: int) -> SortedPairs:
    """Sort the pairs of indices [B, K] (values < n_rows) by row; a stable sort keeps tokens ascending."""
    flat = indices.reshape(-1)
    order = flat.to(torch.int32).argsort(stable=True)  # faster than int64's in every side-by-side run (torch 2.13)
    crow = flat.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    return SortedPairs(crow, order // indices.shape[1], order, (n_rows, len(indices)))


def gather_dot(pairs: SortedPairs, vectors: Tensor, table: Tensor) -> Tensor:
    """out[b, k] = <vectors[b], table[indices[b, k]]>.  pairs of [B, K], [B, d], [N, d] -> [B, K]."""
    pattern = _csr(pairs.crow, pairs.tokens, vectors.new_zeros(len(pairs.order)), pairs.shape)
    with torch.autocast(vectors.device.type, enabled=False):  # backward may run inside autocast
        dots = torch.sparse.sampled_addmm(pattern, table, vectors.T, beta=0.0).values()  # [B·K], sorted by row
    return vectors.new_empty(len(pairs.order)).index_put_((pairs.order,), dots).view(pairs.shape[1], -1)


def scatter_outer(pairs: SortedPairs, coeffs: Tensor, vectors: Tensor) -> Tensor:
    """out[n] = Σ_{(b, k): indices[b, k] = n} coeffs[b, k] · vectors[b].  pairs of [B, K], [B, K], [B, d] -> [N, d].

    Aᵀ as a CSR [N, B] matrix times vectors [B, d].
    """
    a_t = _csr(pairs.crow, pairs.tokens, coeffs.reshape(-1)[pairs.order].to(vectors.dtype), pairs.shape)
    out = vectors.new_empty(pairs.shape[0], vectors.shape[1])
    with torch.autocast(vectors.device.type, enabled=False):  # backward may run inside autocast
        # beta=0 into `out` itself: `a_t @ vectors` zero-fills a result and copies it (2x the time on CPU)
        return torch.addmm(out, a_t, vectors, beta=0.0, out=out)


class TopKLinear(torch.autograd.Function):
    """(values, indices) = TopK_K(ReLU(x Wᵀ + b)); gradients only through the K selected rows.

    With a `selection_bias` β [N], the K rows are chosen by x Wᵀ + b + β while the values stay
    ReLU(x Wᵀ + b) (β steers which rows are used, never how much; it gets no gradient). With
    rectify=False the values are the chosen logits themselves, signed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int, selection_bias: Tensor | None = None,
                rectify: bool = True):
        dtype = compute_dtype(x, weight)
        plain_bias = None if bias is None else bias.to(dtype)
        if selection_bias is not None:
            bias = selection_bias if bias is None else bias + selection_bias
        x_c, w_c, b_c = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        values = x_c.new_empty(len(x), k)
        indices = torch.empty(len(x), k, dtype=torch.int64, device=x.device)
        step = max(1, CHUNK_ELEMENTS // weight.shape[0])
        buffer = _scratch(min(step, len(x)), weight.shape[0], dtype, x.device)  # one [step, N] block, reused
        for start in range(0, len(x), step):
            block = slice(start, start + step)
            rows = x_c[block]
            logits = buffer[: len(rows)]
            if b_c is None:
                torch.mm(rows, w_c.T, out=logits)
            else:
                torch.addmm(b_c, rows, w_c.T, out=logits)
            values[block], indices[block] = row_topk(logits, k)
            if selection_bias is not None:  # the chosen rows' own logits, not (logit + β) − β rounded at β's scale
                chosen = indices[block]
                own = torch.bmm(w_c[chosen], rows.unsqueeze(2)).squeeze(2)  # [b, K, d] @ [b, d, 1] -> [b, K]
                values[block] = own if plain_bias is None else own + plain_bias[chosen]
        if rectify:
            values.relu_()
        ctx.rectify = rectify
        ctx.save_for_backward(x, weight, indices, values)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        x, weight, indices, values = ctx.saved_tensors
        dtype = sparse_dtype(torch.promote_types(x.dtype, weight.dtype))
        grad_logits = (grad_values * (values > 0) if ctx.rectify else grad_values).to(dtype)  # [B, K]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_sum(indices, grad_logits, weight.to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = scatter_outer(sort_pairs(indices, len(weight)), grad_logits, x.to(dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.new_zeros(weight.shape[0]).index_add_(0, indices.reshape(-1), grad_logits.reshape(-1))
            grad_bias = grad_bias.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class SparseDecode(torch.autograd.Function):
    """out = Σ_k values[:, k] · table[indices[:, k]]; backward gathers/scatters K rows per token.

    Under autocast the forward gathers from the table cast to the autocast dtype, as a linear layer
    casts its weight (embedding_bag sums in fp32 and rounds the [B, d] result once; in bf16 at
    N = 16,384, K = 32 it takes 4.4 ms with the cast against 8.4 ms in fp32); the backward is fp32.
    """

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, table: Tensor):
        ctx.save_for_backward(indices, values, table)
        return gather_sum(indices, values, table.to(compute_dtype(values, table)))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        indices, values, table = ctx.saved_tensors
        dtype = sparse_dtype(torch.promote_types(values.dtype, table.dtype))
        grad_out = grad_out.to(dtype)
        grad_values = grad_table = None
        pairs = sort_pairs(indices, len(table))
        if ctx.needs_input_grad[1]:
            grad_values = gather_dot(pairs, grad_out, table.to(dtype)).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_table = scatter_outer(pairs, values.to(dtype), grad_out).to(table.dtype)
        return None, grad_values, grad_table


def topk_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, selection_bias: Tensor | None = None,
                rectify: bool = True) -> tuple[Tensor, Tensor]:
    """TopK_K(ReLU(x Wᵀ + b)), the K chosen by x Wᵀ + b + selection_bias when given, without the
    ReLU when rectify=False.  x [B, d_in], weight [N, d_in], bias [N], selection_bias [N] -> values
    [B, K], indices [B, K].
    """
    return TopKLinear.apply(x, weight, bias, k, selection_bias, rectify)


def sparse_decode(indices: Tensor, values: Tensor, table: Tensor) -> Tensor:
    """Σ_k values[:, k] · table[indices[:, k]].  [B, K] int64, [B, K], [N, d] -> [B, d]."""
    return SparseDecode.apply(indices, values, table)
