"""Dictionaries saved by other libraries, read into mxd's layer classes exactly.

    layer = read_sparsify("checkpoints/run/layers.15.mlp")    # EleutherAI sparsify: cfg.json + sae.safetensors
    layer = mxd.load("checkpoints/run/layers.15.mlp")         # the same: mxd.load (this module's `load`)
                                                              # tells the formats apart

sparsify (`SparseCoder`, versions 1.x): encoder.weight [M, d], encoder.bias [M], W_dec [M, d],
b_dec [d] and, with skip_connection, W_skip [d, d]. A transcoder (transcode=true) computes
f = TopK(ReLU(W_e x + b_e)), ŷ = W_decᵀ f + b_dec (+ W_skip x): our `Transcoder` (`SkipTranscoder`)
with the same tensors. A sparse autoencoder (transcode=false) encodes x − b_dec; that shift is folded
into the encoder bias (b_e − W_e b_dec), so it loads as a transcoder from x to x.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from mxd.files import load_tensors, read_json
from mxd.layers import CONFIG_FILE, SkipTranscoder, SparseLayer, Transcoder, TranscoderConfig
from mxd.layers import load as load_native

SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_LAYER_IN_HOOKPOINT = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")


def is_sparsify(path: str | Path) -> bool:
    """Whether `path` is one hookpoint folder written by sparsify's `SparseCoder.save_to_disk`."""
    path = Path(path)
    return (path / SPARSIFY_CONFIG).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def sparsify_hookpoint_folder(path: str | Path) -> Path:
    """`path` itself when it is a hookpoint folder, else its only hookpoint subfolder (a sparsify run
    folder holding one); ValueError naming the choices when there are several or none."""
    path = Path(path)
    if is_sparsify(path):
        return path
    inner = sorted(p for p in path.iterdir() if is_sparsify(p)) if path.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    if inner:
        raise ValueError(f"{path} holds sparsify coders for several hookpoints ({', '.join(p.name for p in inner)}); "
                         "give one of these folders")
    raise ValueError(f"{path} is not a sparsify coder: it needs {SPARSIFY_CONFIG} and {SPARSIFY_WEIGHTS}")


def layer_from_hookpoint(name: str) -> int | None:
    """The transformer layer a sparsify hookpoint name such as "layers.15.mlp" points at, if it says."""
    match = _LAYER_IN_HOOKPOINT.search(name)
    return int(match.group(1)) if match else None


def read_sparsify(path: str | Path, device: str | torch.device = "cpu") -> SparseLayer:
    """A sparsify transcoder, skip transcoder or TopK SAE as our `Transcoder` / `SkipTranscoder`."""
    path = sparsify_hookpoint_folder(path)
    config_path = path / SPARSIFY_CONFIG
    try:
        cfg = read_json(config_path)
        d, k = int(cfg["d_in"]), int(cfg["k"])
        activation = cfg.get("activation", "topk")
        transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # ValueError: also a file that does not parse
        reason = str(e).removeprefix(f"{config_path}: ")
        raise ValueError(f"{config_path} is not a sparsify coder config ({type(e).__name__}: {reason})") from None
    if activation != "topk":
        raise ValueError(f"{config_path}: activation={activation!r} cannot be represented; supported: 'topk'")
    tensors = load_tensors(path / SPARSIFY_WEIGHTS, device)
    needed = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise ValueError(f"{path / SPARSIFY_WEIGHTS}: missing tensors {missing} (has {sorted(tensors)})")
    width = tensors["encoder.weight"].shape[0]
    expected = {"encoder.weight": (width, d), "encoder.bias": (width,), "W_dec": (width, d), "b_dec": (d,), "W_skip": (d, d)}
    for name in needed:
        if tuple(tensors[name].shape) != expected[name]:
            raise ValueError(f"{path / SPARSIFY_WEIGHTS}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"but d_in={d} and {width} latents imply {expected[name]}")
    encoder_bias = tensors["encoder.bias"]
    if not transcode:  # an SAE encodes x - b_dec: fold the shift into the bias
        encoder_bias = encoder_bias - tensors["encoder.weight"] @ tensors["b_dec"]
    cls = SkipTranscoder if skip else Transcoder
    with torch.device("meta"):
        layer = cls(TranscoderConfig(d, d, width, k))
    state = {"encoder.weight": tensors["encoder.weight"], "encoder.bias": encoder_bias,
             "decoder": tensors["W_dec"], "bias": tensors["b_dec"]}
    if skip:
        state["skip.weight"] = tensors["W_skip"]
    layer.load_state_dict({name: t.float().contiguous() for name, t in state.items()}, assign=True)
    return layer


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseLayer:
    """Any saved layer: an mxd layer folder (config.json + model.safetensors, see `SparseLayer.save`),
    or a sparsify coder (a hookpoint folder, or a run folder holding one)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and path.is_dir() and (is_sparsify(path) or any(map(is_sparsify, path.iterdir()))):
        return read_sparsify(path, device)
    return load_native(path, device)
