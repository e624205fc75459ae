"""Integration: the embedded SmolLM2-135M (converted from its GGUF once) on the built-in corpus."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from mxd.activations import HarvestConfig, harvest
from mxd.models import embedded_model_path, find_mlp, load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_embedded_model_loads_and_predicts(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    site = find_mlp(model, 15)
    assert site.path == "model.layers.15.mlp"
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    assert tokenizer.decode(model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]).strip().startswith("Berlin")


def test_harvest_embedded_model_on_builtin_corpus(smollm2, tmp_path):
    model, tokenizer = smollm2
    cfg = HarvestConfig(out=str(tmp_path / "cache"), layers=[15], max_tokens=4096, chunk_tokens=2048, batch_size=8)
    cache = harvest(cfg, model, tokenizer, progress=False)
    assert cache.n_tokens == 4096 and cache.manifest["d_in"] == 576 and cache.manifest["mlp_paths"] == ["model.layers.15.mlp"]
    cache.verify()
    x, y = next(cache.batches(15, 256, seed=0))
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    torch.testing.assert_close(model.model.layers[15].mlp(x), y, rtol=1e-4, atol=1e-4)
    text = tokenizer.decode(cache.tokens(0)[0])
    assert sum(ch.isalpha() for ch in text) > 0.6 * len(text)  # real prose


def test_killed_conversion_leaves_no_broken_cache(tmp_path, monkeypatch):
    """A conversion killed midway leaves no model folder; the next load converts cleanly."""
    env = {"MXD_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from mxd.models import embedded_model_path as p; p('smollm2-135m')"],
                            env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob("models/smollm2-135m.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # while it writes the converted folder
    proc.wait()
    target = tmp_path / "models" / "smollm2-135m"
    assert list(tmp_path.glob("models/smollm2-135m.tmp-*")), "the conversion was not interrupted while writing"
    assert not target.exists()
    monkeypatch.setenv("MXD_CACHE", str(tmp_path))
    assert embedded_model_path("smollm2-135m") == target
    (target / "model.safetensors").write_bytes(b"truncated")  # damaged: converted again on next use
    model, _ = load_model("smollm2-135m")
    assert model.config.hidden_size == 576
    assert not list(tmp_path.glob("models/*.tmp-*"))  # the killed process's leftover is cleaned up
