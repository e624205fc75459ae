"""Finding, capturing and splicing MLPs of tiny random HF models."""

import copy

import pytest
import torch
from tiny import ALL_ARCHS, CORE_ARCHS, tiny_model

from mxd import MxD, MxDConfig
from mxd.models import SharedPrefix, find_mlp, host_mlp, load_model, mlp_activations, splice

EXPECTED_PATHS = {
    "gpt2": "transformer.h.1.mlp",
    "gpt_neox": "gpt_neox.layers.1.mlp",
    "llama": "model.layers.1.mlp",
    "qwen2": "model.layers.1.mlp",
    "gemma": "model.layers.1.mlp",
    "mistral": "model.layers.1.mlp",
    "opt": "model.decoder.layers.1.fc1..fc2",
}


def _ids(batch=2, seq=16):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_find_mlp_by_structure(arch):
    model = tiny_model(arch)
    site = find_mlp(model, 1)
    assert site.path == EXPECTED_PATHS[arch]
    x, y = mlp_activations(model, _ids(), [site])[1]
    assert x.shape == (2, 16, 32) and y.shape == (2, 16, 32)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_hooks_capture_exact_mlp_input_and_output(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    ids = _ids()
    x, y = mlp_activations(model, ids, [find_mlp(model, 1)], early_exit=False)[1]
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    if arch == "gpt_neox":
        block = model.gpt_neox.layers[1]
        assert block.use_parallel_residual
        expected_x = block.post_attention_layernorm(hidden[1])  # parallel residual: MLP reads the block input
        torch.testing.assert_close(x, expected_x)
    else:
        block = model.transformer.h[1] if arch == "gpt2" else model.model.layers[1]
        norm = block.ln_2 if arch == "gpt2" else block.post_attention_layernorm
        h_mid = hidden[2] - y  # sequential residual: h_out = h_mid + y, and x = norm(h_mid)
        torch.testing.assert_close(x, norm(h_mid), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, block.mlp(x))


@pytest.mark.parametrize("arch", CORE_ARCHS + ["opt"])
def test_early_exit_gives_identical_activations_and_stops(arch):
    model = tiny_model(arch)
    sites = [find_mlp(model, 0), find_mlp(model, 1)]
    calls = []
    last_block = find_mlp(model, 2).output_module
    handle = last_block.register_forward_hook(lambda *a: calls.append(1))
    early = mlp_activations(model, _ids(), sites, early_exit=True)
    assert calls == []  # layer 2 never ran
    full = mlp_activations(model, _ids(), sites, early_exit=False)
    assert calls == [1]
    handle.remove()
    for layer in (0, 1):
        for a, b in zip(early[layer], full[layer]):
            assert torch.equal(a, b)


class _MLPAsLayer(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("arch", CORE_ARCHS + ["opt"])
def test_splice_of_the_mlp_itself_leaves_logits_unchanged(arch):
    model = tiny_model(arch)
    ids = _ids()
    base = model(input_ids=ids).logits
    site = find_mlp(model, 1)
    if arch == "opt":
        block = model.model.decoder.layers[1]
        replacement = lambda x: block.fc2(block.activation_fn(block.fc1(x)))  # noqa: E731
    else:
        replacement = _MLPAsLayer(site.output_module)
    with splice(model, site, replacement):
        assert torch.equal(model(input_ids=ids).logits, base)
        with splice(model, site, lambda x: torch.zeros_like(x)):
            assert not torch.allclose(model(input_ids=ids).logits, base)


def test_splice_a_sparse_layer_and_restore_after_exception():
    model = tiny_model("llama")
    ids = _ids()
    base = model(input_ids=ids).logits
    site = find_mlp(model, 1)
    layer = MxD(MxDConfig(32, 32, 64, 20, 3)).double()  # a different dtype from the model's
    with splice(model, site, layer):
        spliced = model(input_ids=ids).logits
    assert spliced.dtype == base.dtype and not torch.allclose(spliced, base)
    with pytest.raises(RuntimeError, match="boom"):
        with splice(model, site, layer):
            raise RuntimeError("boom")
    assert torch.equal(model(input_ids=ids).logits, base)
    assert not site.output_module._forward_hooks and not site.input_module._forward_pre_hooks


def test_module_path_override():
    model = tiny_model("llama")
    site = find_mlp(model, 2, module_path="model.layers.{layer}.mlp.down_proj")
    assert site.path == "model.layers.2.mlp.down_proj"
    x, y = mlp_activations(model, _ids(), [site])[2]
    assert x.shape[-1] == 64  # down_proj reads the hidden width
    with pytest.raises(ValueError, match="module_path='model.layers.{layer}.nope' is invalid: 'model.layers.2.nope' does not exist"):
        find_mlp(model, 2, module_path="model.layers.{layer}.nope")


def test_bad_layer_and_unreadable_architecture():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"layer 3 is out of range: the model has 3 layers \(0..2\)"):
        find_mlp(model, 3)
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        find_mlp(model, -1)
    block = model.transformer.h[1]
    block.add_module("ffn", copy.deepcopy(block.mlp))  # two MLP-like children: ambiguous
    with pytest.raises(ValueError, match="cannot find the MLP of GPT2Block in layer 1; MLP-like modules found: .*ffn"):
        find_mlp(model, 1)


def test_unknown_model_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("arch,expected", [
    ("gpt2", {"d_hidden": 128, "activation": "gelu_tanh", "glu": False}),
    ("gpt_neox", {"d_hidden": 64, "activation": "gelu", "glu": False}),
    ("llama", {"d_hidden": 64, "activation": "silu", "glu": True}),
    ("gemma", {"d_hidden": 64, "activation": "gelu_tanh", "glu": True}),
    ("opt", {"d_hidden": 64, "activation": "relu", "glu": False}),
])
def test_host_mlp_form(arch, expected):
    model = tiny_model(arch)
    assert host_mlp(model, find_mlp(model, 0)) == expected


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_prefix_gives_the_logits_of_full_forwards(arch):
    """Forwards that reuse blocks 0..L-1 of a captured forward equal full forwards, bit for bit,
    also with a replaced MLP at or after L (GPT-NeoX: parallel residual)."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (3, 16))
    site = find_mlp(model, 2)
    half = lambda x: 0.5 * x  # noqa: E731
    for layer in (0, 1, 2):
        prefix = SharedPrefix(model, layer)
        with prefix.capture():
            base = model(input_ids=ids).logits
        with splice(model, site, half):
            full = model(input_ids=ids).logits
        with prefix.reuse():
            assert torch.equal(model(input_ids=ids).logits, base)
            with splice(model, site, half):
                assert torch.equal(model(input_ids=ids).logits, full)
        assert torch.equal(model(input_ids=ids).logits, base)  # the blocks are restored
