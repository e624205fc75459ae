"""Tiny randomly initialised Hugging Face models and a byte-level tokenizer, built offline (the
fixtures that use them live in conftest.py)."""

import torch

TINY_CTX = 32  # context length of the tiny runs


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
