"""The sparse kernels against autograd's numerical gradients and a dense reference."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxd import sparse_ops
from mxd.reference import dense_topk_relu
from mxd.sparse_ops import sparse_decode, topk_linear


def _close(actual, expected, rel=1e-5):
    """Equal up to `rel` times the scale of `expected` (fp32 sums in different orders)."""
    scale = max(expected.abs().max().item(), 1.0)  # inputs are O(1): sums that cancel keep an O(1) error scale
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=0)


def test_gradcheck_topk_linear():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: topk_linear(x, w, b, 3)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: topk_linear(x, w, None, 9)[0], (x, w))


def test_gradcheck_sparse_decode():
    torch.manual_seed(0)
    indices = torch.randint(0, 7, (5, 3))
    values = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: sparse_decode(indices, v, t), (values, table))


def _check_against_dense(batch, d_in, n, d_out, k, seed):
    """Forward values and every gradient of router + decode equal the dense [B, N] computation."""
    torch.manual_seed(seed)
    x = torch.randn(batch, d_in, requires_grad=True)
    w = torch.randn(n, d_in, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    table = torch.randn(n, d_out, requires_grad=True)
    target = torch.randn(batch, d_out)

    values, indices = topk_linear(x, w, b, k)
    out = sparse_decode(indices, values, table)
    (out * target).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b, table)]
    for t in (x, w, b, table):
        t.grad = None

    dense = dense_topk_relu(x, w, b, k)  # [B, N]
    out_ref = dense @ table
    (out_ref * target).sum().backward()
    _close(values, dense.gather(-1, indices))  # the selected coefficients sit where the dense ones do
    _close(out, out_ref)
    for got, t in zip(grads, (x, w, b, table)):
        _close(got, t.grad)


@pytest.mark.parametrize("batch,n,k", [(1, 10, 1), (1, 10, 10), (17, 33, 1), (17, 33, 33), (64, 200, 16)])
def test_matches_dense_edge_sizes(batch, n, k):
    _check_against_dense(batch, d_in=8, n=n, d_out=6, k=k, seed=batch + n + k)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 40),
    d_in=st.integers(1, 24),
    n=st.integers(1, 64),
    d_out=st.integers(1, 24),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_random_sizes(batch, d_in, n, d_out, k_frac, seed):
    k = max(1, round(k_frac * n))
    _check_against_dense(batch, d_in, n, d_out, k, seed)


def test_blocked_router_logits_match_one_block(monkeypatch):
    """Router logits computed in many small token blocks give the same outputs and gradients as one block."""
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMENTS", 50)
    _check_against_dense(batch=37, d_in=8, n=40, d_out=6, k=5, seed=3)


def test_backward_gradients_are_sparse_in_rows():
    """Only the selected router rows and decoder rows receive gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    w = torch.randn(50, 4, requires_grad=True)
    table = torch.randn(50, 5, requires_grad=True)
    values, indices = topk_linear(x, w, None, 2)
    sparse_decode(indices, values, table).sum().backward()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[indices.flatten()] = True
    assert (w.grad[~touched] == 0).all() and (table.grad[~touched] == 0).all()
    assert (table.grad[touched] != 0).any(dim=1).all()


def test_scatter_outer_ignores_the_contents_of_its_uninitialised_output():
    """`scatter_outer` writes its CSR product with beta=0 into an empty tensor: the backend must not read it."""
    torch.manual_seed(0)
    indices, coeffs, vectors = torch.randint(0, 6, (4, 2)), torch.randn(4, 2), torch.randn(4, 3)
    a_t = torch.zeros(6, 4).index_put_((indices.T.flatten(), torch.arange(4).repeat(2)), coeffs.T.flatten(), accumulate=True)
    expected = a_t @ vectors
    _close(sparse_ops.scatter_outer(sparse_ops.sort_pairs(indices, 6), coeffs, vectors), expected)
    garbage = torch.full((6, 3), float("nan"))
    _close(torch.addmm(garbage, a_t.to_sparse_csr(), vectors, beta=0.0, out=garbage), expected)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 9),
    n=st.integers(1, 3000),
    k_frac=st.floats(0, 0.05),
    levels=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_row_topk_selects_the_same_values_as_torch_topk(batch, n, k_frac, levels, dtype, seed):
    """Exact through every prefilter level, any N mod 8, and ties (scores from a few distinct levels)."""
    torch.manual_seed(seed)
    k = max(1, round(k_frac * n))
    scores = torch.randint(0, levels, (batch, n)).to(dtype) if levels < 8 else torch.randn(batch, n, dtype=dtype)
    values, indices = sparse_ops.row_topk(scores, k)
    expected = torch.topk(scores, k, dim=-1).values
    assert torch.equal(values.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(scores.gather(1, indices), values)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct columns


def test_row_topk_prefilters_on_cpu(monkeypatch):
    """At N >= 32k the selection goes through group maxima: torch.topk never sees a full row."""
    seen = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, *a, **kw: seen.append(x.shape[-1]) or real_topk(x, *a, **kw))
    scores = torch.randn(3, 16384)
    sparse_ops.row_topk(scores, 32)
    assert max(seen) < 16384 // 4


def test_gather_dot_returns_the_dots_in_token_order():
    """`gather_dot` computes in row-sorted order and must put each dot back at its (token, k) place."""
    torch.manual_seed(0)
    indices, vectors, table = torch.randint(0, 5, (7, 3)), torch.randn(7, 4), torch.randn(5, 4)
    expected = torch.einsum("bd,bkd->bk", vectors, table[indices])
    _close(sparse_ops.gather_dot(sparse_ops.sort_pairs(indices, 5), vectors, table), expected)


def test_topk_linear_results_survive_later_calls_and_other_threads():
    """The logits block is a reused per-thread buffer: no result may alias it, and threads must not share it."""
    torch.manual_seed(0)
    inputs = [(torch.randn(33, 8), torch.randn(300, 8), torch.randn(300)) for _ in range(6)]
    expected = [torch.topk(torch.addmm(b, x, w.T), 5, dim=-1).values.relu().sort(-1).values for x, w, b in inputs]
    first = topk_linear(*inputs[0], 5)[0].clone()
    kept = topk_linear(*inputs[0], 5)[0]
    topk_linear(*inputs[1], 5)  # reuses the buffer
    torch.testing.assert_close(kept, first)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda args: topk_linear(*args, 5)[0], inputs * 4))
    for i, values in enumerate(results):
        torch.testing.assert_close(values.sort(-1).values, expected[i % len(inputs)])
