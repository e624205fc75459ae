"""Harvested activation caches and streamed activations on a tiny Llama and real text."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mxd.activations import ActivationCache, CorruptCacheError, HarvestConfig, harvest, stream_activations
from mxd.data import DataConfig, load_blocks
from mxd.models import find_mlp, load_model, mlp_activations

CTX = 32


def _cfg(model_dir, text_dir, out, **kw):
    args = dict(out=str(out), model=str(model_dir), layers=[0, 2], max_tokens=40 * CTX, batch_size=4,
                chunk_tokens=8 * CTX, data=DataConfig(source=str(text_dir), context_len=CTX))
    return HarvestConfig(**(args | kw))


def _all_rows(cache, layer):
    xs, ys = zip(*cache.batches(layer, batch_size=1000, shuffle=False))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cache_round_trips_bit_exactly(tiny_model_dir, text_dir, tmp_path, dtype):
    cfg = _cfg(tiny_model_dir, text_dir, tmp_path / "cache", dtype=dtype)
    cache = harvest(cfg, progress=False)
    assert cache.n_tokens == 40 * CTX and len(cache.chunks) == 5
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == 40 * CTX and manifest["layers"] == [0, 2]
    assert manifest["d_in"] == manifest["d_out"] == 32 and manifest["dtype"] == dtype
    assert all(len(c["sha256"]) == 64 for c in cache.chunks)
    cache.verify()

    model, tokenizer = load_model(str(tiny_model_dir))
    blocks = load_blocks(cfg.data, tokenizer, "train", max_tokens=cfg.max_tokens)
    assert torch.equal(torch.cat([cache.tokens(i) for i in range(5)]), blocks)
    direct = mlp_activations(model, blocks, [find_mlp(model, 0), find_mlp(model, 2)])
    for layer in (0, 2):
        x, y = _all_rows(cache, layer)
        assert x.dtype == cache.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert torch.equal(x, direct[layer][0].reshape(-1, 32).to(x.dtype))
        assert torch.equal(y, direct[layer][1].reshape(-1, 32).to(y.dtype))


def test_shuffled_batches_cover_every_row_once(tiny_model_dir, text_dir, tmp_path):
    cache = harvest(_cfg(tiny_model_dir, text_dir, tmp_path / "cache"), progress=False)
    x_all, y_all = _all_rows(cache, 2)
    batches = list(cache.batches(2, batch_size=100, seed=1))
    assert [len(b[0]) for b in batches] == [100] * 12 + [80]
    x = torch.cat([b[0] for b in batches])
    assert not torch.equal(x, x_all)  # shuffled across chunks
    order = x_all[:, 0].argsort()
    torch.testing.assert_close(x[x[:, 0].argsort()], x_all[order], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([b[1] for b in batches])[x[:, 0].argsort()], y_all[order], rtol=0, atol=0)
    again = list(cache.batches(2, batch_size=100, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    resumed = list(cache.batches(2, batch_size=100, seed=1, start=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[7:], resumed))
    assert not torch.equal(next(cache.batches(2, 100, seed=1, epoch=1))[0], batches[0][0])


_KILLABLE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_activations import _cfg
from mxd.activations import harvest
from mxd.models import load_model
model, tok = load_model({model!r})
model.model.layers[0].register_forward_hook(lambda *a: time.sleep(0.15))  # slow enough to kill midway
harvest(_cfg({model!r}, {text!r}, {out!r}), model, tok, progress=False)
"""


def test_harvest_killed_midway_resumes_to_the_same_cache(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "killed"
    script = _KILLABLE.format(tests=os.path.dirname(__file__), model=str(tiny_model_dir), text=str(text_dir), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script])
    shard = out / "shard-000.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and len(json.loads(shard.read_text())["chunks"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(json.loads(shard.read_text())["chunks"])
    assert 2 <= n_done < 5, "the harvest was not interrupted midway"
    assert not json.loads((out / "manifest.json").read_text())["complete"]

    resumed = harvest(_cfg(tiny_model_dir, text_dir, out), progress=False)
    whole = harvest(_cfg(tiny_model_dir, text_dir, tmp_path / "whole"), progress=False)
    assert [c["sha256"] for c in resumed.chunks] == [c["sha256"] for c in whole.chunks]
    assert not list(out.glob("*.tmp*"))


def test_damaged_chunks_are_reported_by_name(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    harvest(_cfg(tiny_model_dir, text_dir, out), progress=False)
    flipped = out / "chunk-000-000001.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"chunk-000-000001.safetensors \(checksum mismatch\)"):
        ActivationCache(out).verify()
    truncated = out / "chunk-000-000003.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CorruptCacheError, match=r"chunk-000-000003.safetensors \(truncated: 1000 of \d+ bytes\)"):
        ActivationCache(out)
    (out / "chunk-000-000004.safetensors").unlink()
    with pytest.raises(CorruptCacheError, match=r"chunk-000-000004.safetensors \(missing\)"):
        harvest(_cfg(tiny_model_dir, text_dir, out, max_tokens=80 * CTX), progress=False)  # no resume over damage


def test_mismatched_cache_fails_clearly(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    cache = harvest(_cfg(tiny_model_dir, text_dir, out), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"holds a different harvest \(layers: cache has \[0, 2\], requested \[1\]"):
        harvest(_cfg(tiny_model_dir, text_dir, out, layers=[1]), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    with pytest.raises(ValueError, match=r"holds layers \[0, 2\] of model .*, not layer 1 of"):
        cache.check_matches(str(tiny_model_dir), 1)
    with pytest.raises(FileNotFoundError, match="is not an activation cache"):
        ActivationCache(tmp_path)


@pytest.mark.parametrize("kw,message", [
    (dict(chunk_tokens=100), "chunk_tokens=100 is invalid: must be a multiple of context_len=32"),
    (dict(dtype="fp16"), "dtype='fp16' is invalid: valid values are fp32, bf16"),
    (dict(layers=[]), r"layers=\[\] is invalid"),
    (dict(split="holdout"), "split='holdout' is invalid"),
])
def test_bad_harvest_config(tiny_model_dir, text_dir, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tiny_model_dir, text_dir, tmp_path, **kw)


def test_bad_layer_and_tiny_budget(tiny_model_dir, text_dir, tmp_path):
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        harvest(_cfg(tiny_model_dir, text_dir, tmp_path / "a", layers=[7]), progress=False)
    with pytest.raises(ValueError, match="max_tokens=10 is too small"):
        harvest(_cfg(tiny_model_dir, text_dir, tmp_path / "b", max_tokens=10), progress=False)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("Too short for one block.")
    with pytest.raises(ValueError, match="empty corpus: source .* gives no complete block of 32 tokens in its train split"):
        harvest(_cfg(tiny_model_dir, tmp_path / "short", tmp_path / "c"), progress=False)


def test_stream_activations_shuffles_real_activations(tiny_model_dir, text_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    data = DataConfig(source=str(text_dir), context_len=CTX, max_documents=40)
    site = find_mlp(model, 1)
    batches = list(stream_activations(model, tokenizer, site, data, batch_size=64, buffer_tokens=1024,
                                      forward_batch=4, progress=False))
    assert len(batches) > 10 and all(x.shape == y.shape == (64, 32) for x, y in batches)
    blocks = load_blocks(data, tokenizer, "train")
    x_ref, y_ref = (t.reshape(-1, 32) for t in mlp_activations(model, blocks, [site])[1])
    x = torch.cat([b[0] for b in batches])
    assert len(x) > 0.9 * len(x_ref)
    assert not torch.equal(x, x_ref[: len(x)])  # shuffled
    ref = {tuple(r) for r in x_ref[:, :4].tolist()}
    assert all(tuple(r) in ref for r in x[:, :4].tolist())  # every streamed row is a real activation
