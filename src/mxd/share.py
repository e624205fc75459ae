"""Sharing runs: export to other libraries' formats, a model card in every run folder, the Hub.

    export("runs/demo/tc-k32-seed0", "saelens", "out/tc")     # `mxd export`: sparsify, saelens or mxd
    write_model_card("runs/demo/mxd-k32-seed0")               # RUN/README.md: YAML front matter + usage
    push("runs/demo/mxd-k32-seed0", "me/smollm2-l15-mxd")      # `mxd push`
    layer = mxd.load("hf:me/smollm2-l15-mxd")                 # anyone, anywhere

A pushed run holds config.json (its TrainConfig with the model site and text source written in, so
it needs no activation cache), final/, metrics.jsonl, eval.json when it has been evaluated, and the
card; every command that takes a run accepts its `hf:` path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mxd.exchange import write_saelens, write_sparsify
from mxd.files import read_json, write_atomic
from mxd.hub import upload
from mxd.layers import MxD
from mxd.runs import FINAL, RUN_CONFIG, RunInfo, SiteOptions, read_run
from mxd.train import method_name

CARD_FILE = "README.md"
PUSHED_FILES = (RUN_CONFIG, "metrics.jsonl", "eval.json", CARD_FILE)  # besides final/
CARD_METRICS = ("nmse", "fvu", "delta_ce", "ce_recovered", "kl", "l0", "effective_l0", "dead", "dense", "experts_share",
                "eval_tokens", "eval_split")
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def card_metadata(run: RunInfo) -> dict:
    """The card's YAML front matter: what was trained where, and its latest evaluation."""
    config, layer = run.config, run.layer
    meta = {
        "library_name": "mxd",
        "tags": ["mxd", "interpretability", "sparse-dictionary",
                 "mixture-of-decoders" if isinstance(layer, MxD) else "transcoder"],
        "mxd": {
            "model": run.model,
            "layer": run.layer_index,
            "module_path": run.module_path,
            "method": method_name(config["sparse"]),
            "class": type(layer).__name__,
            "k": layer.config.k,
            "latents": layer.n_latents,
            "parameters": layer.param_count(),
            "train_tokens": config.get("train_tokens"),
            "data": asdict(run.data),
        },
    }
    base = EMBEDDED_HUB_IDS.get(run.model, run.model if "/" in run.model and not Path(run.model).exists() else None)
    if base:
        meta["base_model"] = base
    eval_path = run.path / "eval.json"
    if eval_path.is_file():
        record = read_json(eval_path)
        meta["mxd"]["eval"] = {key: record[key] for key in CARD_METRICS if key in record}
    return meta


def model_card(run: RunInfo, repo_id: str | None = None) -> str:
    """README.md text of a run: YAML front matter, a summary and how to load it."""
    meta = card_metadata(run)
    m = meta["mxd"]
    where = f"hf:{repo_id}" if repo_id else str(run.path)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {m['method']} (K = {m['k']}) for {run.model}, layer {m['layer']} MLP", "",
             f"A sparse replacement of the MLP of transformer layer {m['layer']} of `{run.model}`, trained with "
             f"[mxd](https://pypi.org/project/mxd/): {m['class']} with {m['latents']:,} "
             f"{'experts' if m['class'] == 'MxD' else 'latents'}, {m['k']} active per token, "
             f"{m['parameters']:,} parameters, trained on {m['train_tokens'] or 0:,} tokens of `{m['data']['source']}`.", "",
             "```python", "import mxd", f"layer = mxd.load({where!r})    # x [..., d_in] -> (y_hat, codes)", "```", ""]
    if "eval" in m:
        e = m["eval"]
        lines += ["Held-out evaluation (`mxd eval`; definitions in the mxd docs, docs/metrics.md):", "",
                  "| " + " | ".join(e) + " |", "|" + "---|" * len(e),
                  "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in e.values()) + " |", ""]
    return "\n".join(lines)


def write_model_card(run: str | Path | RunInfo) -> Path:
    """Write (or refresh) RUN/README.md of a run folder or an already read run; its path."""
    run = run if isinstance(run, RunInfo) else read_run(run)
    card = run.path / CARD_FILE
    write_atomic(card, lambda tmp: tmp.write_text(model_card(run)))
    return card


def stage(path: str | Path, folder: Path, repo_id: str | None = None) -> None:
    """Copy what a pushed run holds into `folder`: config.json made self-contained (model site and
    text source written in, no cache paths), final/, metrics.jsonl, eval.json, the card."""
    run = read_run(path)
    config = dict(run.config, cache=None, val_cache=None, model=run.model, module_path=run.module_path,
                  model_dtype=run.model_dtype, data=asdict(run.data), layers=[run.layer_index])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    shutil.copytree(run.path / FINAL, folder / FINAL, dirs_exist_ok=True)
    for name in PUSHED_FILES[1:-1]:
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, folder / name)
    (folder / CARD_FILE).write_text(model_card(run, repo_id))


def push(path: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """`mxd push`: upload run `path` to the Hub model repo `repo_id` (created if missing); the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        stage(path, Path(tmp), repo_id)
        return upload(Path(tmp), repo_id, f"mxd push {Path(path).name}", private, token)


EXPORT_FORMATS = ("mxd", "sparsify", "saelens")


@dataclass
class ExportConfig:
    """`mxd export RUN --format FORMAT --out DIR`.

    run: a run folder, or any layer mxd.load reads (a sparsify or SAELens folder, hf:OWNER/REPO);
    format: mxd (the layer's weights and config.json with a self-contained mxd_layer.py reader),
    sparsify or saelens (TopK transcoders and skip transcoders); out: the folder to write, new or
    empty; hookpoint: the sparsify hookpoint folder written inside out (default layers.LAYER.mlp)
    """

    run: str | None = None
    out: str | None = None
    format: str = "mxd"
    hookpoint: str | None = None
    site: SiteOptions = field(default_factory=SiteOptions)

    def __post_init__(self):
        if isinstance(self.site, dict):
            self.site = SiteOptions(**self.site)
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format={self.format!r} is invalid: valid values are {', '.join(EXPORT_FORMATS)}")
        for name in ("run", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required: mxd export RUN --format {self.format} --out DIR")


def export(cfg: ExportConfig) -> Path:
    """Write run `cfg.run`'s layer in `cfg.format` under `cfg.out`; the folder holding it."""
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder: choose a new folder")
    run = read_run(cfg.run, site=cfg.site)
    if cfg.format == "sparsify":
        folder = out / (cfg.hookpoint or f"layers.{run.layer_index}.mlp")
        write_sparsify(run.layer, folder)
        return folder
    if cfg.format == "saelens":
        write_saelens(run.layer, out, model=EMBEDDED_HUB_IDS.get(run.model, run.model), layer_index=run.layer_index)
        return out
    run.layer.save(out)
    shutil.copy2(Path(__file__).with_name("mxd_layer.py"), out / "mxd_layer.py")
    return out


@dataclass
class PushConfig:
    """`mxd push RUN REPO_ID`.

    run: the run folder; repo_id: the Hub model repo, OWNER/NAME (created if missing; the token
    comes from HF_TOKEN or `hf auth login`); private: create the repo private
    """

    run: str | None = None
    repo_id: str | None = None
    private: bool = False

    def __post_init__(self):
        if not self.run or not self.repo_id:
            raise ValueError("run and repo_id are required: mxd push RUN OWNER/NAME")
