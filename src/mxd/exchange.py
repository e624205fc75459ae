"""Dictionaries saved by other libraries, read into mxd's layer classes exactly, and written back.

    layer = read_sparsify("checkpoints/run/layers.15.mlp")    # EleutherAI sparsify: cfg.json + sae.safetensors
    layer = read_saelens("saes/l15")                          # SAELens: cfg.json + sae_weights.safetensors
    layer = mxd.load("checkpoints/run/layers.15.mlp")         # either: mxd.load (this module's `load`)
                                                              # tells the formats apart
    write_sparsify(layer, "out/layers.15.mlp"); write_saelens(layer, "out/l15", model, layer_index)

sparsify (`SparseCoder`, versions 1.x): encoder.weight [M, d], encoder.bias [M], W_dec [M, d],
b_dec [d] and, with skip_connection, W_skip [d, d]. A transcoder (transcode=true) computes
f = TopK(ReLU(W_e x + b_e)), ŷ = W_decᵀ f + b_dec (+ W_skip x): our `Transcoder` (`SkipTranscoder`)
with the same tensors. A sparse autoencoder (transcode=false) encodes x − b_dec; that shift is folded
into the encoder bias (b_e − W_e b_dec), so it loads as a transcoder from x to x.

SAELens (version 6 `SAE.save_model` / `load_from_disk`): W_enc [d_in, M], b_enc [M], W_dec [M, d_out],
b_dec [d_out], W_skip [d_out, d_in]. Architectures "topk" (f = ReLU(TopK(x W_enc + b_enc)), an SAE
from x to x, with b_dec subtracted from x first when apply_b_dec_to_input: folded as for sparsify),
"standard" (ReLU SAE), "transcoder" and "skip_transcoder" (ReLU latents) load exactly, the ReLU
ones as our transcoders with sparsity "l1". SAELens has no TopK transcoder class: a TopK transcoder
with d_in = d_out is written as a "topk" SAE with apply_b_dec_to_input false, the same function.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from mxd.files import load_tensors, read_json, save_tensors, write_json_atomic
from mxd.hub import run_folder
from mxd.layers import CONFIG_FILE, SkipTranscoder, SparseLayer, Transcoder, TranscoderConfig
from mxd.layers import load as load_native

SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_ARCHITECTURES = ("topk", "standard", "transcoder", "skip_transcoder")
FINAL = "final"  # the layer inside an mxd run folder
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
        width = int(cfg.get("num_latents") or 0) or d * int(cfg.get("expansion_factor", 32))  # as sparsify sizes it
        activation = cfg.get("activation", "topk")
        transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # ValueError: also a file that does not parse
        reason = str(e).removeprefix(f"{config_path}: ")
        raise ValueError(f"{config_path} is not a sparsify coder config ({type(e).__name__}: {reason})") from None
    if activation != "topk":
        raise ValueError(f"{config_path}: activation={activation!r} cannot be represented; supported: 'topk'")
    shapes = {"encoder.weight": (width, d), "encoder.bias": (width,), "W_dec": (width, d), "b_dec": (d,)}
    t = _checked_tensors(path / SPARSIFY_WEIGHTS, device, shapes | ({"W_skip": (d, d)} if skip else {}),
                         f"d_in={d} and {width} latents")
    encoder_bias = t["encoder.bias"]
    if not transcode:  # an SAE encodes x - b_dec: fold the shift into the bias
        encoder_bias = encoder_bias - t["encoder.weight"] @ t["b_dec"]
    state = {"encoder.weight": t["encoder.weight"], "encoder.bias": encoder_bias, "decoder": t["W_dec"], "bias": t["b_dec"]}
    if skip:
        state["skip.weight"] = t["W_skip"]
    return _assigned(SkipTranscoder if skip else Transcoder, TranscoderConfig(d, d, width, k), state)


def is_saelens(path: str | Path) -> bool:
    """Whether `path` is a folder written by SAELens's `SAE.save_model`."""
    path = Path(path)
    return (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file()


def read_saelens_config(path: str | Path) -> dict:
    """A SAELens folder's cfg.json, checked to be one we can represent; ValueError naming the file."""
    config_path = Path(path) / SAELENS_CONFIG
    cfg = read_json(config_path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("d_in"), int) or not isinstance(cfg.get("d_sae"), int):
        raise ValueError(f"{config_path} is not a SAELens config: it needs integer d_in and d_sae")
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{config_path}: architecture={arch!r} cannot be represented; supported: "
                         f"{', '.join(SAELENS_ARCHITECTURES)}")
    for name, allowed in (("normalize_activations", "none"), ("reshape_activations", "none"),
                          ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(name, allowed) != allowed:
            raise ValueError(f"{config_path}: {name}={cfg[name]!r} cannot be represented; supported: {allowed!r}")
    if arch == "topk" and not isinstance(cfg.get("k"), int):
        raise ValueError(f"{config_path}: a topk SAE needs an integer k")
    return cfg


def read_saelens(path: str | Path, device: str | torch.device = "cpu") -> SparseLayer:
    """A SAELens TopK or ReLU SAE, transcoder or skip transcoder as our `Transcoder` / `SkipTranscoder`."""
    path = Path(path)
    cfg = read_saelens_config(path)
    arch, d_in, width = cfg.get("architecture", "standard"), cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", d_in) if arch in ("transcoder", "skip_transcoder") else d_in
    t = _checked_tensors(path / SAELENS_WEIGHTS, device, {
        "W_enc": (d_in, width), "b_enc": (width,), "W_dec": (width, d_out), "b_dec": (d_out,),
        **({"W_skip": (d_out, d_in)} if arch == "skip_transcoder" else {})}, f"d_in={d_in}, d_sae={width}, d_out={d_out}")
    encoder_bias = t["b_enc"]
    if arch in ("topk", "standard") and cfg.get("apply_b_dec_to_input", True):  # encodes x − b_dec
        encoder_bias = encoder_bias - t["b_dec"] @ t["W_enc"]
    config = TranscoderConfig(d_in, d_out, width, cfg["k"], "topk") if arch == "topk" else \
        TranscoderConfig(d_in, d_out, width, 1, "l1")
    state = {"encoder.weight": t["W_enc"].T, "encoder.bias": encoder_bias, "decoder": t["W_dec"], "bias": t["b_dec"]}
    if arch == "skip_transcoder":
        state["skip.weight"] = t["W_skip"]
    return _assigned(SkipTranscoder if arch == "skip_transcoder" else Transcoder, config, state)


def write_saelens(layer: SparseLayer, folder: str | Path, model: str | None = None, layer_index: int | None = None,
                  module_path: str | None = None) -> None:
    """Save a transcoder as SAELens's `SAE.save_model` does, for `SAE.load_from_disk`: a TopK
    transcoder (d_in = d_out) as a "topk" SAE, ReLU (l1) ones as "transcoder" / "skip_transcoder";
    `model`, `layer_index` and the Hugging Face `module_path` of the MLP go into its metadata."""
    if not isinstance(layer, Transcoder):
        raise ValueError(f"a {type(layer).__name__} has no saelens form: export it with --format mxd "
                         "(weights + config.json + a self-contained mxd_layer.py)")
    c, skip = layer.config, isinstance(layer, SkipTranscoder)
    if c.sparsity == "topk" and (skip or c.d_in != c.d_out):
        raise ValueError(f"a TopK {'skip transcoder' if skip else f'transcoder with d_in={c.d_in} != d_out={c.d_out}'} "
                         "has no saelens form (SAELens transcoders have ReLU latents): use --format sparsify or mxd")
    arch = "topk" if c.sparsity == "topk" else "skip_transcoder" if skip else "transcoder"
    metadata = {"model_name": model}
    if layer_index is not None:  # TransformerLens names of the MLP's (normalised) input and its output
        metadata |= {"hook_name": f"blocks.{layer_index}.ln2.hook_normalized", "hook_name_out": f"blocks.{layer_index}.hook_mlp_out"}
    if module_path:
        metadata |= {"hf_hook_name": f"{module_path}.input", "hf_hook_name_out": f"{module_path}.output"}
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.width, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata}
    cfg |= {"k": c.k, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {"d_out": c.d_out}
    tensors = {"W_enc": layer.encoder.weight.T, "b_enc": layer.encoder.bias, "W_dec": layer.decoder, "b_dec": layer.bias}
    if skip:
        tensors["W_skip"] = layer.skip.weight
    _write(folder, SAELENS_CONFIG, cfg, SAELENS_WEIGHTS, tensors)


def _checked_tensors(path: Path, device, shapes: dict[str, tuple], implied_by: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each present with its expected shape; ValueError otherwise."""
    tensors = load_tensors(path, device)
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but {implied_by} imply {shape}")
    return tensors


def _assigned(cls, config: TranscoderConfig, state: dict[str, torch.Tensor]) -> SparseLayer:
    """A `cls` layer holding exactly the tensors `state` (as fp32)."""
    with torch.device("meta"):
        layer = cls(config)
    layer.load_state_dict({name: t.float().contiguous() for name, t in state.items()}, assign=True)
    return layer


def write_sparsify(layer: SparseLayer, folder: str | Path) -> None:
    """Save a TopK `Transcoder` / `SkipTranscoder` as sparsify's `SparseCoder.save_to_disk` does
    (cfg.json + sae.safetensors, transcode=true), for `SparseCoder.load_from_disk`."""
    _check_exportable(layer, "sparsify")
    c = layer.config
    tensors = {"encoder.weight": layer.encoder.weight, "encoder.bias": layer.encoder.bias,
               "W_dec": layer.decoder, "b_dec": layer.bias}
    if isinstance(layer, SkipTranscoder):
        tensors["W_skip"] = layer.skip.weight
    cfg = {"activation": "topk", "expansion_factor": max(1, c.width // c.d_in), "normalize_decoder": c.unit_norm_decoder,
           "num_latents": c.width, "k": c.k, "multi_topk": False, "skip_connection": isinstance(layer, SkipTranscoder),
           "transcode": True, "d_in": c.d_in}
    _write(folder, SPARSIFY_CONFIG, cfg, SPARSIFY_WEIGHTS, tensors)


def _check_exportable(layer: SparseLayer, fmt: str) -> None:
    """ValueError unless `layer` is a TopK transcoder with d_in = d_out (what the peer formats hold)."""
    if not isinstance(layer, Transcoder):
        raise ValueError(f"a {type(layer).__name__} has no {fmt} form: export it with --format mxd "
                         "(weights + config.json + a self-contained mxd_layer.py)")
    if layer.config.sparsity != "topk":
        raise ValueError(f"a transcoder with sparsity={layer.config.sparsity!r} has no {fmt} form: {fmt} holds TopK coders only")
    if layer.config.d_in != layer.config.d_out:
        raise ValueError(f"d_in={layer.config.d_in} != d_out={layer.config.d_out}: {fmt} transcoders map a width to itself")


def _write(folder: str | Path, config_name: str, config: dict, weights_name: str, tensors: dict[str, torch.Tensor]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors({name: t.detach().float().contiguous() for name, t in tensors.items()}, folder / weights_name)
    write_json_atomic(folder / config_name, config)


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseLayer:
    """Any saved layer: an mxd layer folder (config.json + model.safetensors, see `SparseLayer.save`),
    an mxd run folder (its final/ layer), a run pushed to the Hub ("hf:OWNER/REPO[@REVISION]"), a
    sparsify coder (a hookpoint folder, or a run folder holding one) or a SAELens dictionary."""
    path = run_folder(path)
    if (path / FINAL / CONFIG_FILE).is_file():
        return load_native(path / FINAL, device)
    if is_saelens(path):
        return read_saelens(path, device)
    if is_sparsify_folder(path):
        return read_sparsify(path, device)
    return load_native(path, device)


def is_sparsify_folder(path: Path) -> bool:
    """A sparsify hookpoint folder, or a run folder holding some (and no mxd layer)."""
    return not (path / CONFIG_FILE).is_file() and path.is_dir() and (is_sparsify(path) or any(map(is_sparsify, path.iterdir())))
