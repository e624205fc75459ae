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
    "mxd_product_key": lambda: MxD(MxDConfig(12, 10, d_hidden=16, n_experts=48, k=5, router="product_key")),
    "mxd_shared_balanced": lambda: MxD(MxDConfig(12, 10, 16, 40, 5, shared_modulator=True, balance_rate=0.1)),
    "mxd_linear_modulation": lambda: MxD(MxDConfig(12, 10, 16, 40, 5, shared_modulator=True, linear_modulation=True)),
    "mxd_signed": lambda: MxD(MxDConfig(12, 10, 16, 40, 5, shared_modulator=True, coefficients="signed", balance_rate=0.1)),
    "mxd_product_key_balanced": lambda: MxD(MxDConfig(12, 10, 16, 48, 5, router="product_key", balance_rate=0.1,
                                                      coefficients="signed", shared_modulator=True)),
    "mxd_dense_only": lambda: MxD(MxDConfig(12, 10, 16, n_experts=0, k=0, shared_modulator=True)),
    "transcoder": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=6)),
    "transcoder_l1": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=1, sparsity="l1")),
    "skip_transcoder": lambda: SkipTranscoder(TranscoderConfig(12, 10, width=48, k=6)),
}


@pytest.fixture(params=sorted(LAYER_KINDS))
def layer(request):
    """A freshly initialised layer of each kind, with every parameter and buffer randomised (no zero inits)."""
    torch.manual_seed(0)
    layer = LAYER_KINDS[request.param]()
    with torch.no_grad():
        for p in [*layer.parameters(), *layer.buffers()]:
            p.add_(torch.randn_like(p) * 0.3)
    layer.normalize_weights_()
    return layer


def tiny_model(arch: str):
    """A tiny randomly initialised causal LM of the given architecture (vocab 257: tiny_tokenizer's, 3 layers)."""
    import transformers as tf

    common = dict(vocab_size=257, num_hidden_layers=3, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    configs = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=257, n_layer=3, n_head=2, n_embd=32, n_positions=128),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common, max_position_embeddings=128),
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128),
        "gemma": lambda: tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128),
        "opt": lambda: tf.OPTConfig(vocab_size=257, num_hidden_layers=3, num_attention_heads=2, hidden_size=32,
                                    ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[arch]()).eval().requires_grad_(False)


CORE_ARCHS = ["gpt2", "gpt_neox", "llama"]
ALL_ARCHS = CORE_ARCHS + ["qwen2", "gemma", "mistral", "opt"]


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, id 256 is EOS) built offline, GPT-2 style (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))} | {"<eos>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama and its tokenizer saved as a local Hugging Face folder."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_dir(tmp_path):
    """A folder of real English text (the Lee news corpus, ~1.2 MB) as .txt documents."""
    from mxd.data import BUILTIN_SOURCES

    folder = tmp_path / "text"
    folder.mkdir()
    docs = list(BUILTIN_SOURCES["builtin:lee"].documents())
    (folder / "lee.txt").write_text("\n\n".join(d.strip() for d in docs))
    return folder
