"""Product-key routing: exact agreement with the flat router over the implied N keys, gradients,
save/load, FLOP counts and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxd import MxD, MxDConfig
from mxd.layers import load
from mxd.routing import FlatRouter, ProductKeyRouter, product_grid
from mxd.sparse_ops import topk_linear


def _random_router(d_in, rows, cols, candidates):
    router = ProductKeyRouter(d_in, rows * cols, candidates)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn_like(p))
    return router


@settings(max_examples=60, deadline=None)
@given(d_in=st.integers(1, 12), side=st.integers(2, 9), extra=st.integers(0, 3), k=st.integers(1, 12),
       all_candidates=st.booleans(), seed=st.integers(0, 2**16))
def test_product_key_selects_what_the_flat_router_over_implied_keys_selects(d_in, side, extra, k, all_candidates, seed):
    torch.manual_seed(seed)
    rows, cols = product_grid(side * (side + extra)) if side * (side + extra) > 0 else (side, side)
    k = min(k, rows * cols)
    router = _random_router(d_in, rows, cols, candidates=max(rows, cols) if all_candidates else 0)  # 0: K candidates
    x = torch.randn(7, d_in, dtype=torch.float64)
    router.double()
    values, indices = router.topk(x, k)
    weight, bias = router.flat_equivalent()
    flat_values, flat_indices = topk_linear(x, weight, bias, k)
    torch.testing.assert_close(values.sort(-1).values, flat_values.sort(-1).values, rtol=1e-12, atol=1e-12)
    positive = flat_values > 0  # zero (ReLU'd) coefficients may tie in any order
    assert all(set(a[p].tolist()) == set(b[q].tolist())
               for a, b, p, q in zip(indices, flat_indices, values > 0, positive))
    torch.testing.assert_close(router.logits(x), torch.nn.functional.linear(x, weight, bias))


def test_gradients_match_the_flat_equivalent():
    torch.manual_seed(0)
    router = _random_router(6, 5, 7, candidates=0).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, *params: router.topk(x, 4)[0], (x, *router.parameters()))
    g = torch.randn(35, dtype=torch.float64)  # a weight per expert: the loss does not depend on slot order
    values, indices = router.topk(x, 4)
    (values * g[indices]).sum().backward()
    grads = [p.grad.clone() for p in (x, router.rows.weight, router.cols.weight)]
    x.grad = None
    w = router.flat_equivalent()[0].detach().requires_grad_()
    flat_values, flat_indices = topk_linear(x, w, router.flat_equivalent()[1].detach(), 4)
    (flat_values * g[flat_indices]).sum().backward()
    torch.testing.assert_close(grads[0], x.grad)  # d/dx agrees with the flat router's
    # a row weight's gradient is the sum of the gradients of the flat keys in its row
    torch.testing.assert_close(grads[1], w.grad.view(5, 7, 6).sum(1))
    torch.testing.assert_close(grads[2], w.grad.view(5, 7, 6).sum(0))


def test_product_key_mxd_saves_loads_and_counts_parameters(tmp_path):
    layer = MxD(MxDConfig(12, 10, 16, n_experts=64, k=4, router="product_key", router_candidates=6))
    assert layer.param_count() == sum(p.numel() for p in layer.parameters())
    flat = MxD(MxDConfig(12, 10, 16, n_experts=64, k=4))
    assert flat.param_count() - layer.param_count() == (64 - 16) * 13  # 64 flat keys vs 8 + 8 sub-keys
    layer.save(tmp_path / "pk")
    loaded = load(tmp_path / "pk")
    x = torch.randn(5, 12)
    assert loaded.config.router == "product_key" and torch.equal(loaded(x)[0], layer(x)[0])


def test_router_flops():
    flat, pk = FlatRouter(576, 65_536), ProductKeyRouter(576, 65_536)
    assert flat.flops_per_token(32) == 2 * 65_536 * 576
    assert pk.flops_per_token(32) == 2 * 512 * 576 + 32 * 32
    assert flat.flops_per_token(32) / pk.flops_per_token(32) > 100


def test_bad_input():
    with pytest.raises(ValueError, match="n_experts=6911 is invalid for router=product_key: .* such as 6889"):
        MxDConfig(12, 10, 16, n_experts=6911, k=4, router="product_key")
    with pytest.raises(ValueError, match="router='hash'"):
        MxDConfig(12, 10, 16, n_experts=64, k=4, router="hash")
    assert product_grid(65_536) == (256, 256) and product_grid(6_912) == (72, 96)


def test_fewer_candidates_are_approximate_but_keep_k_experts():
    torch.manual_seed(1)
    router = _random_router(8, 16, 16, candidates=3)  # 9 pairs scored for K = 8
    x = torch.randn(200, 8)
    values, indices = router.topk(x, 8)
    router.candidates = 0
    exact_values, exact_indices = router.topk(x, 8)
    assert indices.shape == (200, 8) and all(len(set(row.tolist())) == 8 for row in indices)
    assert (values.sum(-1) <= exact_values.sum(-1) + 1e-5).all()  # never better than exact
    assert (values.sum(-1) < exact_values.sum(-1) - 1e-5).any()   # and here sometimes worse
    assert router.flops_per_token(8) == 2 * 32 * 8 + 8 * 8


def test_balanced_product_key_router_moves_row_and_column_biases():
    layer = MxD(MxDConfig(12, 10, 16, n_experts=6, k=2, router="product_key", balance_rate=0.5, coefficients="signed",
                          shared_modulator=True))
    router = layer.router  # a 2 x 3 grid
    counts = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 2.0])  # row loads 4, 2; column loads 4, 0, 2
    layer.balance_(counts, 3, torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(router.row_bias, torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(router.col_bias, torch.tensor([-0.5, 0.5, 0.0]))  # the column at the mean stays
    torch.testing.assert_close(router.selection_bias, torch.tensor([-1.0, 0.0, -0.5, 0.0, 1.0, 0.5]))
