"""MxD routers: which K experts a token uses, and their coefficients a = TopK_K(ReLU(logits)).

FlatRouter scores all N experts with one linear map, O(N·d_in) per token. ProductKeyRouter (in the
manner of product-key memories / PEER) lays the N experts on an n_rows × n_cols grid and scores
expert (i, j) as r_i(x) + s_j(x), with two linear sub-routers over n_rows + n_cols ≈ 2√N sub-keys:
it takes the top `candidates` rows and columns, scores their Cartesian product and keeps the top K,
for O(√N·d_in + candidates²) per token. With candidates ≥ K the result is exact: if row i of a
top-K pair (i, j) were not among the top-K rows, the K pairs (i', j) of higher rows would all rank
above it (and likewise for columns).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mxd.sparse_ops import topk_linear


class FlatRouter(nn.Linear):
    """logits = W_r x + b_r over all N experts (weight [N, d_in]); top-K through the fused kernel.

    balanced: keep a selection bias β [N] (a buffer, no gradient) that is added to the logits when
    the K experts are chosen but not to their coefficients; `balance_` moves it so that every expert
    is chosen about equally often (loss-free load balancing, as in DeepSeek-V3).
    """

    def __init__(self, d_in: int, n_experts: int, balanced: bool = False, rectify: bool = True):
        super().__init__(d_in, n_experts)
        self.register_buffer("selection_bias", torch.zeros(n_experts) if balanced else None)
        self.rectify = rectify

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """TopK_K(ReLU(logits)) (signed logits when not rectify), chosen by logits + β when balanced:
        values [B, K], indices [B, K]."""
        return topk_linear(x, self.weight, self.bias, k, self.selection_bias, self.rectify)

    @torch.no_grad()
    def balance_(self, counts: Tensor, rate: float, cap: float = 0.0, tokens: int = 0, dead: Tensor | None = None) -> None:
        """Move β from `counts` [N], how often each expert was chosen among `tokens` tokens.

        cap = 0: β_n += rate · sign(mean load − load_n), toward equal load. cap > 0: only experts
        chosen on more than `cap` of the tokens are pushed down, and the `dead` ones ([N] bool) up.
        """
        if not cap:
            self.selection_bias.add_(torch.sign(counts.float().mean() - counts.float()), alpha=rate)
            return
        step = dead.float() if dead is not None else torch.zeros_like(self.selection_bias)
        self.selection_bias.add_(step - (counts.float() > cap * tokens).float(), alpha=rate)

    def logits(self, x: Tensor, experts: Tensor | None = None) -> Tensor:
        """logits of the given experts (default all): [B, d_in] -> [B, n]."""
        if experts is None:
            return super().forward(x)
        return nn.functional.linear(x, self.weight[experts], self.bias[experts])

    def flops_per_token(self, k: int) -> int:
        return 2 * self.out_features * self.in_features


def product_grid(n_experts: int) -> tuple[int, int]:
    """(n_rows, n_cols) with n_rows · n_cols = n_experts, n_rows the largest divisor ≤ √N; ValueError if
    that leaves a grid so unbalanced (n_rows < √N / 2) that product keys would save little."""
    n_rows = max(d for d in range(1, math.isqrt(n_experts) + 1) if n_experts % d == 0)
    if n_rows < math.sqrt(n_experts) / 2:
        square = math.isqrt(n_experts) ** 2
        raise ValueError(f"n_experts={n_experts} is invalid for router=product_key: it factors only as "
                         f"{n_rows} x {n_experts // n_rows}; use a near-square product such as {square}")
    return n_rows, n_experts // n_rows


class ProductKeyRouter(nn.Module):
    """logit(i·n_cols + j) = r_i(x) + s_j(x) for expert (i, j) of an n_rows × n_cols grid.

    rows: Linear d_in -> n_rows; cols: Linear d_in -> n_cols; candidates: rows and columns kept
    before the product is scored (0: K, which is exact; fewer, down to √K, is cheaper and approximate).
    """

    def __init__(self, d_in: int, n_experts: int, candidates: int = 0, rectify: bool = True, balanced: bool = False):
        super().__init__()
        self.rectify = rectify
        self.n_rows, self.n_cols = product_grid(n_experts)
        # selection biases of the rows and columns (see FlatRouter): they steer which sub-keys are chosen, not the values
        self.register_buffer("row_bias", torch.zeros(self.n_rows) if balanced else None)
        self.register_buffer("col_bias", torch.zeros(self.n_cols) if balanced else None)
        self.candidates = candidates
        self.rows = nn.Linear(d_in, self.n_rows)
        self.cols = nn.Linear(d_in, self.n_cols)
        bound = 1 / math.sqrt(d_in)  # the flat router's init, split between the two halves
        for linear in (self.rows, self.cols):
            nn.init.uniform_(linear.weight, -bound / 2, bound / 2)
            nn.init.uniform_(linear.bias, -bound / 2, bound / 2)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """TopK_K(ReLU(logits)) from the candidates' product: values [B, K], indices [B, K]."""
        c = self._candidates(k)
        r_logits, s_logits = self.rows(x), self.cols(x)  # [B, n_rows], [B, n_cols]
        if self.row_bias is not None:  # choose by biased scores, weigh by the logits
            _, r_idx = (r_logits + self.row_bias).topk(min(c, self.n_rows), dim=-1)
            _, s_idx = (s_logits + self.col_bias).topk(min(c, self.n_cols), dim=-1)
            r_sel, s_sel = r_logits.gather(1, r_idx) + self.row_bias[r_idx], s_logits.gather(1, s_idx) + self.col_bias[s_idx]
        else:
            r_sel, r_idx = r_logits.topk(min(c, self.n_rows), dim=-1)  # [B, c_r]
            s_sel, s_idx = s_logits.topk(min(c, self.n_cols), dim=-1)  # [B, c_s]
        scores = (r_sel.unsqueeze(2) + s_sel.unsqueeze(1)).flatten(1)  # [B, c_r · c_s]
        _, pos = scores.topk(k, dim=-1)
        rows = r_idx.gather(1, pos // s_idx.shape[1])
        cols = s_idx.gather(1, pos % s_idx.shape[1])
        values = r_logits.gather(1, rows) + s_logits.gather(1, cols)
        return values.relu() if self.rectify else values, rows * self.n_cols + cols

    @property
    def selection_bias(self) -> Tensor | None:
        """The flat selection bias [N] the row and column biases imply (None when not balanced)."""
        return None if self.row_bias is None else (self.row_bias.unsqueeze(1) + self.col_bias.unsqueeze(0)).flatten()

    @torch.no_grad()
    def balance_(self, counts: Tensor, rate: float, cap: float = 0.0, tokens: int = 0, dead: Tensor | None = None) -> None:
        """Move the row and column biases toward equal load, from `counts` [N] (how often each expert
        was chosen); `cap` is not supported here (0 only)."""
        grid = counts.float().view(self.n_rows, self.n_cols)
        for bias, load in ((self.row_bias, grid.sum(1)), (self.col_bias, grid.sum(0))):
            bias.add_(torch.sign(load.mean() - load), alpha=rate)

    def logits(self, x: Tensor, experts: Tensor | None = None) -> Tensor:
        """logits of the given experts (default all N): [B, d_in] -> [B, n]."""
        full = (self.rows(x).unsqueeze(2) + self.cols(x).unsqueeze(1)).flatten(1)  # [B, N]
        return full if experts is None else full[:, experts]

    def flat_equivalent(self) -> tuple[Tensor, Tensor]:
        """(weight [N, d_in], bias [N]) of the flat router with the same logits."""
        w = (self.rows.weight.unsqueeze(1) + self.cols.weight.unsqueeze(0)).flatten(0, 1)
        b = (self.rows.bias.unsqueeze(1) + self.cols.bias.unsqueeze(0)).flatten()
        return w, b

    def _candidates(self, k: int) -> int:
        """Rows and columns kept: `candidates` (K if 0), raised to K if their product had fewer than K pairs."""
        c = self.candidates or k
        return c if min(c, self.n_rows) * min(c, self.n_cols) >= k else k

    def flops_per_token(self, k: int) -> int:
        c = self._candidates(k)
        d_in = self.rows.in_features
        return 2 * (self.n_rows + self.n_cols) * d_in + min(c, self.n_rows) * min(c, self.n_cols)
