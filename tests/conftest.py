import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub here: fail fast instead of retrying

import pytest
import torch

from mxd import MxD, MxDConfig, SkipTranscoder, Transcoder, TranscoderConfig

# One small instance of every layer kind, by name (d_in=12, d_out=10).
LAYER_KINDS = {
    "mxd_glu": lambda: MxD(MxDConfig(12, 10, d_hidden=16, n_experts=40, k=5, activation="silu", glu=True)),
    "mxd_mlp": lambda: MxD(MxDConfig(12, 10, d_hidden=16, n_experts=40, k=5, activation="gelu", glu=False)),
    "mxd_unit_norm": lambda: MxD(MxDConfig(12, 10, 16, 40, 5, unit_norm_modulators=True, bias=False)),
    "transcoder": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=6)),
    "transcoder_l1": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=1, sparsity="l1")),
    "skip_transcoder": lambda: SkipTranscoder(TranscoderConfig(12, 10, width=48, k=6)),
}


@pytest.fixture(params=sorted(LAYER_KINDS))
def layer(request):
    """A freshly initialised layer of each kind, with every parameter randomised (no zero inits)."""
    torch.manual_seed(0)
    layer = LAYER_KINDS[request.param]()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer.normalize_weights_()
    return layer


def tiny_model(arch: str):
    """A tiny randomly initialised causal LM of the given architecture (vocab 256, 3 layers)."""
    import transformers as tf

    common = dict(vocab_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    configs = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=256, n_layer=3, n_head=2, n_embd=32, n_positions=128),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common, max_position_embeddings=128),
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128),
        "gemma": lambda: tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128),
        "opt": lambda: tf.OPTConfig(vocab_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_size=32,
                                    ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[arch]()).eval().requires_grad_(False)


CORE_ARCHS = ["gpt2", "gpt_neox", "llama"]
ALL_ARCHS = CORE_ARCHS + ["qwen2", "gemma", "mistral", "opt"]
