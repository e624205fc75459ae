"""Saving and loading layers: config.json + model.safetensors, round trip, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxd
from mxd import MxD, MxDConfig
from mxd.files import sha256


def test_round_trip(layer, tmp_path):
    layer.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded = mxd.load(tmp_path / "run")
    assert type(loaded) is type(layer) and loaded.config == layer.config
    for (name, a), (name_b, b) in zip(layer.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b)
    x = torch.randn(8, 12)
    y, codes = layer(x)
    y2, codes2 = loaded(x)
    assert torch.equal(y, y2) and torch.equal(codes.indices, codes2.indices)
    y2.sum().backward()  # a loaded layer trains
    assert all(p.grad is not None for p in loaded.parameters())


def _saved(tmp_path):
    layer = MxD(MxDConfig(8, 6, 10, 20, 3))
    layer.save(tmp_path)
    return tmp_path / "config.json", tmp_path / "model.safetensors"


def test_unknown_class_fails_clearly(tmp_path):
    config, _ = _saved(tmp_path)
    meta = json.loads(config.read_text())
    meta["class"] = "JumpReLUSAE"
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown layer class 'JumpReLUSAE'.*valid: MxD, Transcoder, SkipTranscoder"):
        mxd.load(tmp_path)


def test_missing_tensor_fails_clearly(tmp_path):
    config, weights = _saved(tmp_path)
    tensors = load_file(str(weights))
    del tensors["router.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):  # config.json records its sha256
        mxd.load(tmp_path)
    meta = json.loads(config.read_text())
    config.write_text(json.dumps(meta | {"sha256": sha256(weights)}))  # edited consistently: the tensors are checked
    with pytest.raises(ValueError, match=r"missing tensors \['router.weight'\]"):
        mxd.load(tmp_path)


def test_shape_mismatch_fails_clearly(tmp_path):
    config, _ = _saved(tmp_path)
    meta = json.loads(config.read_text())
    meta["config"]["n_experts"] = 30
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'modulators' has shape \(20, 6\) but .* implies \(30, 6\)"):
        mxd.load(tmp_path)


def test_bad_config_fields_fail_clearly(tmp_path):
    config, _ = _saved(tmp_path)
    meta = json.loads(config.read_text())
    meta["config"]["n_expert"] = meta["config"].pop("n_experts")
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown MxDConfig fields \['n_expert'\]"):
        mxd.load(tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="is not an mxd layer config"):
        mxd.load(tmp_path)


def test_not_a_layer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved mxd layer"):
        mxd.load(tmp_path)
