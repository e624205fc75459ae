"""Read a training run folder (written by `mxd train`) back: the trained layer and where it belongs.

    run = read_run("runs/demo/mxd-k32-seed0")
    run.layer, run.model, run.layer_index, run.module_path, run.data    # MxD, "smollm2-135m", 15, None, DataConfig
    model, tokenizer = run.load_model()                                 # in the dtype it was harvested with

A run folder holds `config.json` (the TrainConfig) and `final/` (the layer); the model, MLP site and
text source come from the manifest of the activation cache it was trained on, or from the config of
a run that streamed its activations from the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mxd.activations import DTYPES, MANIFEST, read_manifest
from mxd.data import DataConfig
from mxd.exchange import (FINAL, SAELENS_WEIGHTS, SPARSIFY_CONFIG, SPARSIFY_WEIGHTS, is_saelens, is_sparsify,
                          is_sparsify_folder, layer_from_hookpoint, read_saelens, read_saelens_config, read_sparsify,
                          sparsify_hookpoint_folder)
from mxd.files import read_json
from mxd.hub import run_folder
from mxd.layers import SkipTranscoder, SparseLayer, load
from mxd.models import load_model

RUN_CONFIG = "config.json"


@dataclass
class RunInfo:
    """A trained run: its layer and the model site it stands in for.

    path: the run folder; layer: the trained sparse layer (from final/); model: embedded model name,
    local folder or Hub id; layer_index: the transformer layer whose MLP it replaces; module_path:
    the MLP module override used at harvest (or None); model_dtype: the dtype the model ran in at
    harvest ("fp32" or "bf16"; `torch_dtype` gives the torch dtype); data: the text source of the training cache;
    cache, val_cache: the activation caches it was trained / validated on (None when it streamed
    its activations, or had no validation cache);
    config: the run's TrainConfig as a dict.
    """

    path: Path
    layer: SparseLayer
    model: str
    layer_index: int
    module_path: str | None
    model_dtype: str
    data: DataConfig
    cache: Path | None
    val_cache: Path | None
    config: dict

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.model_dtype]

    def load_model(self, device: str = "cpu"):
        """(model, tokenizer) of the run's model, in the dtype it was harvested with."""
        return load_model(self.model, dtype=self.torch_dtype, device=device)


def _resolve(cache: str, run: Path) -> Path:
    """A cache path as recorded (relative to where `mxd train` ran), else relative to the run folder."""
    path = Path(cache).expanduser()
    if path.is_absolute() or (path / MANIFEST).is_file():
        return path
    return run / path if (run / path / MANIFEST).is_file() else path


@dataclass
class SiteOptions:
    """Where a coder saved by another library belongs (a sparsify folder names none of it, a SAELens
    folder may name its model and hook; mxd runs ignore these options).

    model: the model it was trained on (embedded name, local folder or Hub id); layer: the
    transformer layer whose MLP it replaces (None: read from a hookpoint folder name such as
    layers.15.mlp); module_path: override of the MLP module; model_dtype: fp32 or bf16, the dtype the
    model runs in
    """

    model: str | None = None
    layer: int | None = None
    module_path: str | None = None
    model_dtype: str = "bf16"

    def __post_init__(self):
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype={self.model_dtype!r} is invalid: valid values are {', '.join(DTYPES)}")


def is_run(path: Path) -> bool:
    """Whether `path` is a run folder of mxd (config.json) or a coder saved by sparsify or SAELens."""
    return (path / RUN_CONFIG).is_file() or is_sparsify(path) or is_saelens(path)


def _read_foreign_run(path: Path, site: SiteOptions | None, device: str) -> RunInfo:
    """A sparsify or SAELens coder as a run: its site from `site`, else from what its files say."""
    site = site or SiteOptions()
    if is_saelens(path):
        folder, fmt, meta = path, "saelens", read_saelens_config(path).get("metadata") or {}
        model, hookpoint = site.model or meta.get("model_name"), meta.get("hook_name") or path.name
        layer = read_saelens(folder, device=device)
    else:
        folder = sparsify_hookpoint_folder(path)
        fmt, model, hookpoint = "sparsify", site.model, folder.name
        layer = read_sparsify(folder, device=device)
    layer_index = site.layer if site.layer is not None else layer_from_hookpoint(hookpoint)
    if model is None:
        raise ValueError(f"{folder} is a {fmt} coder that does not name its model: give --model (e.g. smollm2-135m)")
    if layer_index is None:
        raise ValueError(f"{folder} is a {fmt} coder whose hookpoint {hookpoint!r} names no layer: give --layer")
    kind = "skip_transcoder" if isinstance(layer, SkipTranscoder) else "transcoder"
    config = {"format": fmt, "sparse": {"kind": f"{fmt}_{kind}", "k": layer.config.k},
              "hookpoint": hookpoint, "seed": None, "train_tokens": None}
    return RunInfo(path=folder, layer=layer.eval().requires_grad_(False), model=model, layer_index=layer_index,
                   module_path=site.module_path, model_dtype=site.model_dtype, data=DataConfig(), cache=None,
                   val_cache=None, config=config)


def read_run(path: str | Path, device: str = "cpu", site: SiteOptions | None = None) -> RunInfo:
    """The `RunInfo` of run folder `path`; ValueError when it is not a finished run or its cache is gone.

    A run trained on a cache takes its model, site and text source from the cache's manifest; a run
    that streamed its activations (config `model` set) from its own config; a coder saved by
    sparsify from `site` (its layer also from its hookpoint name). "hf:OWNER/REPO[@REVISION]" reads
    a run pushed to the Hugging Face Hub (`mxd push`).
    """
    run = run_folder(path)
    config_path, final = run / RUN_CONFIG, run / FINAL
    if is_saelens(run) or is_sparsify_folder(run):
        return _read_foreign_run(run, site, device)
    if not config_path.is_file() or not final.is_dir():
        raise ValueError(f"{str(path)!r} is not a training run: it needs {RUN_CONFIG} and {FINAL}/ (written by mxd train), "
                         f"{SPARSIFY_CONFIG} and {SPARSIFY_WEIGHTS} (sparsify) or {SPARSIFY_CONFIG} and {SAELENS_WEIGHTS} (SAELens)")
    config = read_json(config_path)
    try:
        layers = [config["layer"]] if config.get("layer") is not None else config.get("layers")
        if config.get("cache"):
            cache = _resolve(config["cache"], run)
            if not (cache / MANIFEST).is_file():
                raise ValueError(f"run {str(path)!r} was trained on cache {str(cache)!r}, which has no {MANIFEST}")
            source = read_manifest(cache)
            layers = layers or source["layers"]
        else:  # streamed from a model: the config itself names the site and the text
            cache, source = None, config
        val_cache = _resolve(config["val_cache"], run) if config.get("val_cache") else None
        return RunInfo(
            path=run,
            layer=load(final, device=device).eval().requires_grad_(False),
            model=source["model"],
            layer_index=layers[0],
            module_path=source.get("module_path"),
            model_dtype=source.get("model_dtype", "fp32"),
            data=DataConfig(**source["data"]),
            cache=cache,
            val_cache=val_cache if val_cache is not None and (val_cache / MANIFEST).is_file() else None,
            config=config,
        )
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a readable TrainConfig ({type(e).__name__}: {e})") from None
