"""Read a training run folder (written by `mxd train`) back: the trained layer and where it belongs.

    run = read_run("runs/demo/mxd")
    run.layer, run.model, run.layer_index, run.module_path, run.data    # MxD, "smollm2-135m", 15, None, DataConfig

A run folder holds `config.json` (the TrainConfig) and `final/` (the layer); the model, MLP site and
text source come from the manifest of the activation cache it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mxd.activations import MANIFEST
from mxd.data import DataConfig
from mxd.layers import SparseLayer, load

RUN_CONFIG = "config.json"
FINAL = "final"


@dataclass
class RunInfo:
    """A trained run: its layer and the model site it stands in for.

    path: the run folder; layer: the trained sparse layer (from final/); model: embedded model name,
    local folder or Hub id; layer_index: the transformer layer whose MLP it replaces; module_path:
    the MLP module override used at harvest (or None); data: the text source of the training cache;
    cache, val_cache: the activation caches it was trained / validated on (val_cache may be None);
    config: the run's TrainConfig as a dict.
    """

    path: Path
    layer: SparseLayer
    model: str
    layer_index: int
    module_path: str | None
    data: DataConfig
    cache: Path
    val_cache: Path | None
    config: dict

    @property
    def name(self) -> str:
        """A short label for tables: the run folder's name."""
        return self.path.name


def _resolve(cache: str, run: Path) -> Path:
    """A cache path as recorded (relative to where `mxd train` ran), else relative to the run folder."""
    path = Path(cache).expanduser()
    if path.is_absolute() or (path / MANIFEST).is_file():
        return path
    return run / path if (run / path / MANIFEST).is_file() else path


def read_run(path: str | Path, device: str = "cpu") -> RunInfo:
    """The `RunInfo` of run folder `path`; ValueError when it is not a finished run or its cache is gone."""
    run = Path(path).expanduser()
    config_path, final = run / RUN_CONFIG, run / FINAL
    if not config_path.is_file() or not final.is_dir():
        raise ValueError(f"{str(path)!r} is not a training run: it needs {RUN_CONFIG} and {FINAL}/ (written by mxd train)")
    try:
        config = json.loads(config_path.read_text())
        cache = _resolve(config["cache"], run)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a TrainConfig ({type(e).__name__}: {e})") from None
    if not (cache / MANIFEST).is_file():
        raise ValueError(f"run {str(path)!r} was trained on cache {str(cache)!r}, which has no {MANIFEST}")
    manifest = json.loads((cache / MANIFEST).read_text())
    layer_index = config.get("layer")
    if layer_index is None:
        layer_index = (config.get("layers") or manifest["layers"])[0]
    val_cache = _resolve(config["val_cache"], run) if config.get("val_cache") else None
    return RunInfo(
        path=run,
        layer=load(final, device=device).eval().requires_grad_(False),
        model=manifest["model"],
        layer_index=layer_index,
        module_path=manifest.get("module_path"),
        data=DataConfig(**manifest["data"]),
        cache=cache,
        val_cache=val_cache if val_cache is not None and (val_cache / MANIFEST).is_file() else None,
        config=config,
    )
