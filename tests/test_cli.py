"""The mxd command line: options from configs, exit code 2 on bad input, torchrun sharding."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mxd.activations import ActivationCache
from mxd.cli import main

CTX = 32


def _run(*args, **env):
    return subprocess.run([sys.executable, "-m", "mxd", *args], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"} | env, timeout=300)


def _harvest_args(model_dir, text_dir, out, *extra):
    return ["harvest", "--model", str(model_dir), "--source", str(text_dir), "--context-len", str(CTX),
            "--layers", "0", "2", "--max-tokens", str(24 * CTX), "--chunk-tokens", str(4 * CTX),
            "--batch-size", "4", "--out", str(out), *extra]


def test_harvest_command(tiny_model_dir, text_dir, tmp_path):
    main(_harvest_args(tiny_model_dir, text_dir, tmp_path / "cache", "--dtype", "bf16"))
    cache = ActivationCache(tmp_path / "cache")
    assert cache.n_tokens == 24 * CTX and cache.layers == [0, 2] and cache.dtype == torch.bfloat16


def test_config_file_supplies_defaults(tiny_model_dir, text_dir, tmp_path):
    config = tmp_path / "harvest.yaml"
    config.write_text(f"model: {tiny_model_dir}\nlayers: [1]\nmax_tokens: {8 * CTX}\n"
                      f"data:\n  source: {text_dir}\n  context_len: {CTX}\n")
    main(["harvest", "--config", str(config), "--chunk-tokens", str(4 * CTX), "--out", str(tmp_path / "c")])
    cache = ActivationCache(tmp_path / "c")
    assert cache.layers == [1] and cache.n_tokens == 8 * CTX and cache.manifest["context_len"] == CTX


@pytest.mark.parametrize("args,message", [
    (["--layers", "9"], "layer 9 is out of range: the model has 3 layers (0..2)"),
    (["--context-len", "1"], "context_len=1 is invalid"),
    (["--dtype", "fp8"], "dtype='fp8' is invalid"),
    (["--source", "./no/such/folder"], "unknown data source './no/such/folder'"),
])
def test_bad_input_exits_2_without_traceback(tiny_model_dir, text_dir, tmp_path, args, message):
    result = _run(*_harvest_args(tiny_model_dir, text_dir, tmp_path / "cache"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"mxd harvest: error: {result.stderr.split('error: ', 1)[1].strip()}"]


def test_unknown_model_exits_2(tmp_path):
    result = _run("harvest", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "cannot load model 'no-such-org/no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


def test_torchrun_ranks_harvest_disjoint_shards(tiny_model_dir, text_dir, tmp_path):
    """Two processes write one cache holding exactly the blocks a single process writes."""
    out2, out1 = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "mxd", *_harvest_args(tiny_model_dir, text_dir, out2)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    main(_harvest_args(tiny_model_dir, text_dir, out1))
    two, one = ActivationCache(out2), ActivationCache(out1)
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["shards"] == ["shard-000.json", "shard-001.json"]
    assert manifest["complete"] and two.n_tokens == one.n_tokens == 24 * CTX
    assert {c["file"][:9] for c in two.chunks} == {"chunk-000", "chunk-001"}
    blocks = lambda cache: sorted(map(tuple, torch.cat([cache.tokens(i) for i in range(len(cache.chunks))]).tolist()))
    assert blocks(two) == blocks(one)
    x2 = torch.cat([b[0] for b in two.batches(2, 10_000, shuffle=False)])
    x1 = torch.cat([b[0] for b in one.batches(2, 10_000, shuffle=False)])
    torch.testing.assert_close(x2[x2[:, 0].argsort()], x1[x1[:, 0].argsort()], rtol=1e-5, atol=1e-6)
