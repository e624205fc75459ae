import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub here: fail fast instead of retrying

import pytest
import torch

from tiny import TINY_CTX, tiny_model, tiny_tokenizer

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


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """{"mxd": run folder, "transcoder": run folder}, trained 60 steps on a harvested tiny-Llama cache
    (shared by test_dashboard, test_probe and test_steer)."""
    from mxd.activations import HarvestConfig, harvest
    from mxd.data import BUILTIN_SOURCES, DataConfig
    from mxd.train import LayerSpec, OptimConfig, Trainer, TrainConfig

    root = tmp_path_factory.mktemp("runs")
    model_dir, text = root / "tiny-llama", root / "lee.txt"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text("\n\n".join(d.strip() for d in BUILTIN_SOURCES["builtin:lee"].documents()))
    caches = []
    for split, tokens in (("train", 128 * TINY_CTX), ("validation", 32 * TINY_CTX)):
        caches.append(str(root / f"cache-{split}"))
        harvest(HarvestConfig(out=caches[-1], model=str(model_dir), layers=[1], split=split, max_tokens=tokens,
                              chunk_tokens=32 * TINY_CTX, data=DataConfig(source=str(text), context_len=TINY_CTX)), progress=False)
    runs = {}
    for kind in ("mxd", "transcoder"):
        runs[kind] = root / kind
        Trainer(TrainConfig(out=str(runs[kind]), cache=caches[0], val_cache=caches[1], train_tokens=60 * 256,
                            batch_tokens=256, eval_every=1000, checkpoint_every=1000,
                            sparse=LayerSpec(kind=kind, k=4, expansion=4), optim=OptimConfig(lr=3e-3, warmup_steps=10)),
                progress=False).train()
    return runs
