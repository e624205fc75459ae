"""The layers: interface, equality with the dense reference, the paper's lemmas, options, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from mxd import MxD, MxDConfig, SkipTranscoder, Transcoder, TranscoderConfig, match_n_experts
from mxd.layers import ACTIVATIONS, match_skip_width
from mxd.reference import dense_forward
from mxd.sparse_ops import topk_linear


def _close(actual, expected, rel=1e-5):
    scale = max(expected.abs().max().item(), 1.0)  # inputs are O(1): sums that cancel keep an O(1) error scale
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=0)


# --- interface and dense reference -------------------------------------------------------------


def test_interface_shapes(layer):
    x = torch.randn(7, 12)
    y, codes = layer(x)
    assert y.shape == (7, 10)
    assert codes.indices.dtype == torch.int64 and codes.indices.shape == codes.values.shape
    assert codes.indices.shape[0] == 7 and (codes.indices < layer.n_latents).all()
    torch.testing.assert_close(layer.decode(layer.encode(x), x), y)
    assert layer.param_count() == sum(p.numel() for p in layer.parameters())


def test_matches_dense_reference(layer):
    """Output and every parameter's gradient equal the dense [B, N] computation."""
    x = torch.randn(33, 12)
    target = torch.randn(33, 10)
    (layer(x)[0] * target).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref = dense_forward(layer, x)
    (y_ref * target).sum().backward()
    _close(layer(x)[0], y_ref)
    for name, p in layer.named_parameters():
        _close(sparse_grads[name], p.grad)


def test_codes_hold_k_entries_or_every_active_latent(layer):
    x = torch.randn(9, 12)
    codes = layer.encode(x)
    if getattr(layer.config, "sparsity", "topk") == "topk":
        assert codes.indices.shape == (9, layer.config.k)
        if getattr(layer.config, "coefficients", "relu") == "relu":
            assert (codes.values >= 0).all()
    else:  # a ReLU transcoder: exactly the positive pre-activations, each with its value
        f = torch.relu(layer.encoder(x))
        torch.testing.assert_close(codes.to_dense(layer.n_latents), f)
        assert ((codes.values > 0).sum(-1) == (f > 0).sum(-1)).all()


def test_codes_to_dense():
    codes = MxD(MxDConfig(4, 4, 4, 20, 3)).encode(torch.randn(5, 4))
    dense = codes.to_dense(20)
    assert dense.shape == (5, 20)
    torch.testing.assert_close(dense.gather(-1, codes.indices), codes.values)
    assert ((dense != 0).sum(-1) <= 3).all()


# --- the maths of the paper --------------------------------------------------------------------

shapes = dict(
    d_in=st.integers(1, 12), d_out=st.integers(1, 12), d_hidden=st.integers(1, 12), n=st.integers(1, 30),
    k_frac=st.floats(0, 1), glu=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)),
    seed=st.integers(0, 2**16),
)


def _random_mxd(d_in, d_out, d_hidden, n, k_frac, glu, activation, seed):
    torch.manual_seed(seed)
    k = max(1, round(k_frac * n))
    return MxD(MxDConfig(d_in, d_out, d_hidden, n, k, activation=activation, glu=glu, decoder_init_std=1.0))


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_lemma2_sum_of_experts_equals_output(**kw):
    """Σ_n a_n W_nᵀ z, with the experts materialised, equals the layer's output minus its bias."""
    layer = _random_mxd(**kw)
    x = torch.randn(6, kw["d_in"], dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():
        y, codes = layer(x)
        z = layer.hidden(x)  # [B, H]
        w = layer.expert_weights(torch.arange(layer.n_latents))  # [N, H, O]
        a = codes.to_dense(layer.n_latents)  # [B, N]
        y_experts = torch.einsum("bn,nho,bh->bo", a, w, z)
    torch.testing.assert_close(y - layer.bias, y_experts)


@settings(max_examples=30, deadline=None)
@given(**shapes)
def test_lemma1_random_experts_are_full_rank(**kw):
    """With D of full rank and c_n without zeros, every expert has normalised rank 1 (D and c_n kept
    well away from singular, so fp32 rank estimation is not the thing tested)."""
    layer = _random_mxd(**kw)
    with torch.no_grad():  # D with orthonormal rows or columns; |c_n| entries in [0.5, 1]
        q, _ = torch.linalg.qr(torch.randn(max(layer.decoder.weight.shape), min(layer.decoder.weight.shape)))
        layer.decoder.weight.copy_(q if q.shape == layer.decoder.weight.shape else q.T)
        m = layer.modulators
        m.copy_(torch.sign(m + (m == 0)) * (0.5 + 0.5 * m.abs()))
    ranks = layer.expert_rank(torch.arange(layer.n_latents))
    assert torch.equal(ranks, torch.ones(layer.n_latents))


def test_expert_rank_drops_with_zero_modulators():
    """The rank measure is not constant: zeroing entries of c_n lowers it."""
    layer = MxD(MxDConfig(8, 8, 16, 4, 1, decoder_init_std=1.0))
    with torch.no_grad():
        layer.modulators[0, :4] = 0
    assert layer.expert_rank(torch.tensor([0, 1])).tolist() == [0.5, 1.0]


def _mxd_as_mlp(enc_w, enc_b, up_w, up_b, dec_w, dec_b, activation):
    """An MxD with N = 1, K = 1 and c_1 = 1 holding the given MLP / GLU weights ([out, in] layout)."""
    d_hidden, d_in = enc_w.shape
    layer = MxD(MxDConfig(d_in, dec_w.shape[0], d_hidden, 1, 1, activation=activation,
                          glu=up_w is not None, bias=enc_b is not None or dec_b is not None))
    with torch.no_grad():
        layer.encoder.weight.copy_(enc_w)
        if up_w is not None:
            layer.up.weight.copy_(up_w)
        layer.decoder.weight.copy_(dec_w)
        for param, value in ((layer.encoder.bias, enc_b), (getattr(layer.up, "bias", None), up_b), (layer.bias, dec_b)):
            if param is not None:
                param.copy_(value if value is not None else torch.zeros_like(param))
        layer.router.weight.zero_()
        layer.router.bias.fill_(1.0)  # a = ReLU(0 x + 1) = 1 for every token
        layer.modulators.fill_(1.0)
    return layer


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 16), d_hidden=st.integers(1, 16), d_out=st.integers(1, 16), glu=st.booleans(),
       bias=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_generalises_mlp_and_glu(d_in, d_hidden, d_out, glu, bias, activation, seed):
    torch.manual_seed(seed)
    enc, up, dec = torch.nn.Linear(d_in, d_hidden, bias), torch.nn.Linear(d_in, d_hidden, bias), torch.nn.Linear(d_hidden, d_out, bias)
    act = ACTIVATIONS[activation]
    layer = _mxd_as_mlp(enc.weight, enc.bias, up.weight if glu else None, up.bias if glu else None,
                        dec.weight, dec.bias, activation)
    x = torch.randn(5, d_in)
    with torch.no_grad():
        expected = dec(act(enc(x)) * up(x)) if glu else dec(act(enc(x)))
        torch.testing.assert_close(layer(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_reproduces_hf_mlps_exactly():
    """GPT-2's MLP (gelu_tanh, biases) and Llama's SwiGLU MLP, as MxDs with N = K = 1."""
    torch.manual_seed(0)
    gpt2 = GPT2MLP(4 * 24, GPT2Config(n_embd=24, activation_function="gelu_new", resid_pdrop=0.0)).eval()
    llama = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")).eval()
    as_gpt2 = _mxd_as_mlp(gpt2.c_fc.weight.T, gpt2.c_fc.bias, None, None, gpt2.c_proj.weight.T, gpt2.c_proj.bias, "gelu_tanh")
    as_llama = _mxd_as_mlp(llama.gate_proj.weight, None, llama.up_proj.weight, None, llama.down_proj.weight, None, "silu")
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(as_gpt2(x.view(-1, 24))[0], gpt2(x).view(-1, 24), rtol=1e-6, atol=1e-6)
        assert torch.equal(as_llama(x.view(-1, 24))[0], llama(x).view(-1, 24))


# --- parameter matching ------------------------------------------------------------------------


def test_match_n_experts_gpt2():
    n = match_n_experts(768, 768, 3072, 32 * 768, glu=False)
    assert n == 21_504
    assert abs(n - 21_490) / 21_490 < 0.002  # the paper's design note: ≈21,490


@pytest.mark.parametrize("glu,bias", [(True, True), (False, True), (True, False)])
def test_matched_layers_have_equal_parameter_counts(glu, bias):
    width = 20 * 24
    n = match_n_experts(24, 20, 64, width, glu=glu, bias=bias)
    mxd = MxD(MxDConfig(24, 20, 64, n, 8, glu=glu, bias=bias))
    tc = Transcoder(TranscoderConfig(24, 20, width, 8))
    assert mxd.param_count() == mxd.config.param_count()
    assert tc.param_count() == tc.config.param_count()
    assert SkipTranscoder(tc.config).param_count() == tc.config.param_count(skip=True)
    assert abs(mxd.param_count() - tc.param_count()) <= (24 + 20 + 1) / 2


def test_match_n_experts_rejects_too_small_width():
    with pytest.raises(ValueError, match="transcoder_width=1"):
        match_n_experts(24, 20, 64, 1, glu=True)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=41), "k=41 is invalid: must be between 1 and n_experts=40"),
    (dict(k=0), "k=0 is invalid"),
    (dict(d_in=0), "d_in=0 is invalid: must be an integer >= 1"),
    (dict(d_hidden=-3), "d_hidden=-3 is invalid"),
    (dict(n_experts=0, k=1), "n_experts=0 is invalid"),
    (dict(activation="swish"), "activation='swish' is invalid: valid values are 'gelu', 'gelu_tanh', 'silu', 'relu'"),
    (dict(decoder_init_std=-1.0), "decoder_init_std=-1.0"),
])
def test_mxd_config_rejects_bad_values(kwargs, message):
    args = dict(d_in=8, d_out=8, d_hidden=16, n_experts=40, k=4) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MxDConfig(**args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=49), "k=49 is invalid: must be between 1 and width=48"),
    (dict(width=0), "width=0 is invalid"),
    (dict(sparsity="jumprelu"), "sparsity='jumprelu' is invalid: valid values are 'topk', 'l1'"),
])
def test_transcoder_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TranscoderConfig(**(dict(d_in=8, d_out=8, width=48, k=4) | kwargs))


# --- options -----------------------------------------------------------------------------------


def test_unit_norm_modulators_stay_unit_norm_through_training():
    torch.manual_seed(0)
    layer = MxD(MxDConfig(12, 10, 16, 40, 5, unit_norm_modulators=True))
    torch.testing.assert_close(layer.modulators.norm(dim=1), torch.ones(40))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.randn(32, 12), torch.randn(32, 10)
        opt.zero_grad()
        F.mse_loss(layer(x)[0], y).backward()
        layer.project_gradients_()
        grad, rows = layer.modulators.grad, layer.modulators.detach()
        torch.testing.assert_close((grad * rows).sum(1), torch.zeros(40), atol=1e-6, rtol=0)
        opt.step()
        layer.normalize_weights_()
        torch.testing.assert_close(layer.modulators.norm(dim=1), torch.ones(40))


def test_without_unit_norm_option_weights_are_left_alone():
    layer = MxD(MxDConfig(12, 10, 16, 40, 5))
    before = layer.modulators.detach().clone()
    assert not torch.allclose(before.norm(dim=1), torch.ones(40))
    layer.normalize_weights_()
    assert torch.equal(layer.modulators, before)


def test_init_follows_design():
    torch.manual_seed(0)
    layer = MxD(MxDConfig(64, 64, 128, 4000, 4, decoder_init_std=0.0))
    assert (layer.decoder.weight == 0).all()
    assert layer.modulators.min() >= -1 and layer.modulators.max() <= 1 and layer.modulators.std() > 0.5
    bound = 1 / math.sqrt(64)
    assert layer.router.weight.abs().max() <= bound and layer.encoder.weight.abs().max() <= bound
    assert abs(MxD(MxDConfig(64, 64, 128, 40, 4)).decoder.weight.std().item() - 0.01) < 0.001


def test_l1_transcoder_keeps_every_active_latent():
    torch.manual_seed(0)
    layer = Transcoder(TranscoderConfig(12, 10, width=48, k=1, sparsity="l1"))
    x = torch.randn(9, 12)
    codes = layer.encode(x)
    f = F.relu(layer.encoder(x))
    torch.testing.assert_close(codes.to_dense(48), f)
    assert codes.indices.shape[1] == int((f > 0).sum(-1).max()) > 1
    expected_l1 = (f * layer.decoder.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(layer.l1_penalty(codes), expected_l1)


def test_skip_transcoder_starts_as_transcoder_and_learns_skip():
    torch.manual_seed(0)
    cfg = TranscoderConfig(12, 10, width=48, k=6)
    skip = SkipTranscoder(cfg)
    plain = Transcoder(cfg)
    plain.load_state_dict({k: v for k, v in skip.state_dict().items() if not k.startswith("skip.")})
    x = torch.randn(5, 12)
    assert (skip.skip.weight == 0).all()
    torch.testing.assert_close(skip(x)[0], plain(x)[0])
    (skip(x)[0] - torch.randn(5, 10)).pow(2).sum().backward()  # the zero-initialised decoder outputs b = 0
    assert skip.skip.weight.grad.abs().sum() > 0


def test_transcoder_decoder_starts_at_zero_or_uniform():
    torch.manual_seed(0)
    zero = Transcoder(TranscoderConfig(12, 10, width=48, k=6))
    uniform = Transcoder(TranscoderConfig(12, 10, width=48, k=6, decoder_init="uniform"))
    assert (zero.decoder == 0).all()
    assert uniform.decoder.abs().max() <= 1 / 48**0.5 and uniform.decoder.abs().min() > 0
    with pytest.raises(ValueError, match="decoder_init='zero' is invalid with unit_norm_decoder"):
        TranscoderConfig(12, 10, width=48, k=6, unit_norm_decoder=True)


# --- bf16 autocast -----------------------------------------------------------------------------


def test_bf16_autocast_forward_backward(layer):
    """Under CPU bf16 autocast: matmuls in bf16, fp32 gradients, results close to fp32.

    Routing in bf16 may pick a different expert where two logits are within bf16 rounding, so the
    output is compared with the codes held fixed, and the routing by its agreement.
    """
    x = torch.randn(64, 12)
    target = torch.randn(64, 10)
    y32, codes32 = layer(x)
    (y32 * target).sum().backward()
    grads32 = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, codes16 = layer(x)
        assert codes16.values.dtype == torch.bfloat16  # the encoder/router matmul ran in bf16
        (y16.float() * target).sum().backward()
        y16_same_codes = layer.decode(codes32, x).float()
    rel = (y16_same_codes - y32).norm() / y32.norm()
    assert rel < 0.02, f"bf16 output differs from fp32 by {rel:.3f}"
    if layer.n_latents:  # (the dense-only MxD has no codes)
        agree = F.cosine_similarity(codes16.to_dense(layer.n_latents), codes32.to_dense(layer.n_latents).detach()).mean()
        assert agree > 0.95, f"bf16 codes agree with fp32 codes by cosine {agree:.3f}"
    for name, p in layer.named_parameters():
        assert p.grad.dtype == p.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
        cos = F.cosine_similarity(p.grad.flatten(), grads32[name].flatten(), dim=0)
        assert cos > 0.95, f"{name}: bf16 gradient cosine {cos:.3f}"


# --- always-on remedies, the dense-only reference, ablations, data init, budgets ----------------


def test_selection_bias_chooses_but_does_not_weigh():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(6, 12), torch.randn(40, 12), torch.randn(40)
    beta = torch.zeros(40)
    beta[7] = 100.0  # expert 7 is always chosen, with its own (unbiased) coefficient
    values, indices = topk_linear(x, weight, bias, 5, beta)
    logits = F.linear(x, weight, bias)
    assert (indices == 7).any(-1).all()
    torch.testing.assert_close(values, logits.gather(1, indices).relu())
    plain_values, plain_indices = topk_linear(x, weight, bias, 5)
    assert set(indices[0].tolist()) - {7} <= set(plain_indices[0].tolist())


def test_balance_moves_the_selection_bias_toward_equal_load():
    layer = MxD(MxDConfig(12, 10, 16, n_experts=4, k=1, balance_rate=0.5))
    no_dead = torch.zeros(4, dtype=torch.bool)
    layer.balance_(torch.tensor([10.0, 0.0, 3.0, 3.0]), 16, no_dead)  # mean load 4
    torch.testing.assert_close(layer.router.selection_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    capped = MxD(MxDConfig(12, 10, 16, n_experts=4, k=1, balance_rate=0.5, balance_cap=0.5))
    capped.balance_(torch.tensor([10.0, 0.0, 3.0, 3.0]), 16, torch.tensor([False, True, False, False]))
    torch.testing.assert_close(capped.router.selection_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))  # > 8 of 16; dead
    unbalanced = MxD(MxDConfig(12, 10, 16, n_experts=4, k=1))
    unbalanced.balance_(torch.tensor([10.0, 0.0, 3.0, 3.0]), 16, no_dead)  # a no-op without balance_rate
    assert unbalanced.router.selection_bias is None and "router.selection_bias" not in unbalanced.state_dict()


def test_shared_modulator_and_the_dense_only_reference():
    torch.manual_seed(0)
    x = torch.randn(8, 12)
    dense_only = MxD(MxDConfig(12, 10, 16, n_experts=0, k=0, shared_modulator=True))
    assert dense_only.n_latents == 0 and dense_only.router is None and dense_only.modulators is None
    with torch.no_grad():
        dense_only.shared.uniform_(0.5, 1.5)
        dense_only.bias.normal_()
    torch.testing.assert_close(dense_only(x)[0], dense_only.dense(x) * dense_only.shared + dense_only.bias)
    assert dense_only.param_count() == MxDConfig(12, 10, 16, 0, 0, shared_modulator=True).param_count()
    shared = MxD(MxDConfig(12, 10, 16, n_experts=40, k=5, shared_modulator=True))
    codes = shared.encode(x)
    torch.testing.assert_close(shared.modulation(codes, x), codes.to_dense(40) @ shared.modulators + shared.shared)
    with pytest.raises(ValueError, match="needs shared_modulator=True"):
        MxDConfig(12, 10, 16, n_experts=0, k=0)
    with pytest.raises(ValueError, match="balance_rate=-1"):
        MxDConfig(12, 10, 16, 40, 5, balance_rate=-1)
    with pytest.raises(ValueError, match="flat router only"):
        MxDConfig(12, 10, 16, 49, 5, router="product_key", balance_rate=0.1, balance_cap=0.5)


def test_ablations_of_an_mxd():
    torch.manual_seed(0)
    layer = MxD(MxDConfig(12, 10, 16, n_experts=40, k=5, shared_modulator=True))
    with torch.no_grad():
        layer.decoder.weight.normal_()
    x = torch.randn(8, 12)
    everyone, nobody = torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    torch.testing.assert_close(layer.ablated(x, keep=everyone), layer(x)[0])
    torch.testing.assert_close(layer.ablated(x, keep=nobody), layer.dense(x) * layer.shared + layer.bias)
    fixed = torch.randn(10)
    torch.testing.assert_close(layer.ablated(x, modulation=fixed), layer.dense(x) * fixed + layer.bias)
    some = torch.rand(40) > 0.5
    codes = layer.encode(x)
    kept = codes.to_dense(40) * some
    torch.testing.assert_close(layer.ablated(x, keep=some), layer.dense(x) * (kept @ layer.modulators + layer.shared) + layer.bias)


def test_data_init_centres_the_transcoder():
    torch.manual_seed(0)
    layer = Transcoder(TranscoderConfig(12, 10, width=48, k=6))
    mean_x, mean_y = torch.randn(12), torch.randn(10)
    layer.init_from_means_(mean_x, mean_y)
    torch.testing.assert_close(layer.bias.data, mean_y)
    torch.testing.assert_close(F.linear(mean_x, layer.encoder.weight, layer.encoder.bias), torch.zeros(48), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(mean_x[None])[0][0], mean_y)  # the zero decoder outputs b


@pytest.mark.parametrize("d_in, d_out, width", [(576, 576, 9216), (768, 768, 24576), (12, 10, 480)])
def test_skip_transcoder_width_pays_for_its_skip_matrix(d_in, d_out, width):
    budget = TranscoderConfig(d_in, d_out, width, 1).param_count()
    skip = SkipTranscoder(TranscoderConfig(d_in, d_out, match_skip_width(d_in, d_out, width), 1))
    assert abs(skip.param_count() - budget) / budget < 0.005
    assert abs(skip.param_count() - budget) <= (d_in + d_out + 1) / 2


def test_selection_bias_keeps_bf16_coefficients_at_their_own_precision():
    """A large β must not round the chosen coefficients: (logit + β) − β in bf16 would zero small ones."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(64, 96), torch.randn(2000, 96) / 10, torch.randn(2000) * 0.1
    beta = torch.randn(2000) * 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = topk_linear(x, weight, bias, 16, beta, rectify=False)
    exact = F.linear(x, weight, bias).gather(1, indices)
    assert (values != 0).all()
    assert ((values.float() - exact).abs() <= 0.02 * exact.abs() + 0.02).all()
