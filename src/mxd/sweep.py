"""A grid of parameter-matched runs (methods × K × seeds, and layers) trained from one source and
evaluated together, collected in `frontier.json` (`mxd sweep`).

    SWEEP/sweep.json                         the SweepConfig
    SWEEP/{method}-k{K}-seed{S}/             one run folder per cell (layer{L}- prefixed with several layers)
    SWEEP/lr-grid/{method}-k{K}-lr{LR}-seed{S}/   learning-rate selection cells (with lr_grid)
    SWEEP/mxd-k0-seed{S}/                    the dense-only MxD reference (with dense_reference)
    SWEEP/frontier.json, frontier.md         one record per cell (see mxd.evaluate)

Every cell has the parameter budget of a transcoder of width expansion × d_in (MxD's expert count
and a skip transcoder's width are derived from it). With `lr_grid`, each method first trains at
K = lr_grid_k with its learning rate times each multiplier; the one with the lowest final
validation nmse (the training's validation cache) is then used at every K, its K = lr_grid_k run
standing as that cell. `lr_selection` instead reads the selection.json of an earlier sweep's grid
(same methods and budget) and trains every K, lr_grid_k included, at the multipliers it chose.
Evaluate on the test split (eval_split=test, data harvested with
test_fraction > 0) so that neither training nor selection saw the reported text. Rerunning
resumes: finished cells are not retrained, evaluated cells are not re-evaluated, half-trained cells
continue from their newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mxd.activations import read_manifest
from mxd.evaluate import EVAL_FILE, FRONTIER, EvalConfig, evaluate_runs, markdown_table, write_results
from mxd.files import read_json, read_jsonl
from mxd.runs import SiteOptions, read_run
from mxd.share import write_model_card
from mxd.train import METHODS, Trainer, TrainConfig, config_differences, method_spec


@dataclass
class SweepConfig:
    """A sweep; its folder is the training config's out, its K axis the training config's ks.

    methods: layer kinds or named variants in the grid (mxd, mxd_paper, transcoder,
    skip_transcoder); seeds: one cell per seed; lr_grid: multipliers of each method's learning rate
    tried at K = lr_grid_k, the best on the validation cache used for every K (None: no selection);
    lr_grid_k: the K of the learning-rate selection; lr_selection: a selection.json written by an
    earlier sweep's lr_grid, whose chosen multipliers are used without training a grid; dense_reference: also train the dense-only MxD
    (k = 0), drawn as a reference line; extra_runs: runs trained elsewhere (mxd runs, or sparsify
    coders of the sweep's model) evaluated with the cells and put in the frontier
    """

    train: TrainConfig
    methods: list[str] = field(default_factory=lambda: ["mxd", "transcoder", "skip_transcoder"])
    seeds: list[int] = field(default_factory=lambda: [0])
    lr_grid: list[float] | None = None
    lr_grid_k: int = 32
    lr_selection: str | None = None
    dense_reference: bool = False
    extra_runs: list[str] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for name, cls in (("train", TrainConfig), ("eval", EvalConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} is invalid: give distinct values among {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} is invalid: give distinct seeds")
        if self.lr_grid is not None:
            if not self.lr_grid or len(set(self.lr_grid)) != len(self.lr_grid) or min(self.lr_grid) <= 0:
                raise ValueError(f"lr_grid={self.lr_grid} is invalid: give distinct multipliers > 0")
            if not self.train.val_cache:
                raise ValueError("lr_grid needs val_cache: learning rates are chosen on the validation cache")
            if self.lr_grid_k < 1:
                raise ValueError(f"lr_grid_k={self.lr_grid_k} is invalid: must be >= 1")
        if self.lr_selection is not None and self.lr_grid is not None:
            raise ValueError("give lr_grid (select learning rates here) or lr_selection (use an earlier selection), not both")

    def _cell(self, folder: Path, layer: int | None, method: str, k: int, seed: int, lr_scale: float = 1.0) -> TrainConfig:
        t = self.train
        return replace(t, out=str(folder), layers=None if layer is None else [layer], ks=None, seed=seed,
                       sparse=replace(method_spec(t.sparse, method), k=k),
                       optim=replace(t.optim, lr_scale=t.optim.lr_scale * lr_scale),
                       resume=(folder / "config.json").exists())

    def _layers(self) -> list[tuple[int | None, str]]:
        """(layer, folder-name prefix) of every layer in the grid."""
        layers = self.train.layers or [None]
        return [(layer, f"layer{layer}-" if len(layers) > 1 else "") for layer in layers]

    def grid_cells(self) -> dict[tuple, TrainConfig]:
        """{(layer, method, seed, multiplier): config} of the learning-rate selection (empty without lr_grid)."""
        out = Path(self.train.out) / "lr-grid"
        return {(layer, method, seed, mult): self._cell(out / f"{prefix}{method}-k{self.lr_grid_k}-lrx{mult:g}-seed{seed}",
                                                        layer, method, self.lr_grid_k, seed, mult)
                for layer, prefix in self._layers() for method in self.methods for seed in self.seeds
                for mult in self.lr_grid or []}

    def grid_keys(self) -> list[tuple]:
        """(layer, method, seed) of every learning rate the sweep chooses."""
        return [(layer, method, seed) for layer, _ in self._layers() for method in self.methods for seed in self.seeds]

    def cells(self, chosen: dict[tuple, float] | None = None, from_grid: bool = True) -> list[TrainConfig]:
        """One training config per frontier cell, its out a subfolder of the sweep folder; `chosen`
        maps (layer, method, seed) to the selected lr multiplier (cells at lr_grid_k then are the
        grid's, unless not from_grid: chosen came from an earlier sweep)."""
        out, ks = Path(self.train.out), self.train.ks or [self.train.sparse.k]
        grid = self.grid_cells()
        cells = []
        for layer, prefix in self._layers():
            for k in ks:  # all methods at one K before the next K: an interrupted sweep still compares
                for method in self.methods:
                    for seed in self.seeds:
                        mult = (chosen or {}).get((layer, method, seed))
                        if mult is not None and k == self.lr_grid_k and from_grid:
                            cells.append(grid[(layer, method, seed, mult)])
                        else:
                            cells.append(self._cell(out / f"{prefix}{method}-k{k}-seed{seed}", layer, method, k, seed,
                                                    mult or 1.0))
            if self.dense_reference:
                cells += [self._cell(out / f"{prefix}mxd-k0-seed{seed}", layer, "mxd", 0, seed) for seed in self.seeds]
        return cells


def final_val_nmse(run: Path) -> float:
    """The last validation nmse logged in a run's metrics.jsonl."""
    records = read_jsonl(run / "metrics.jsonl")
    values = [r["val_nmse"] for r in records if r.get("val_nmse") is not None]
    if not values:
        raise ValueError(f"{run}/metrics.jsonl has no validation nmse: was the run trained with a val_cache?")
    return values[-1]


SPEED_ONLY = {"shared_prefix"}  # EvalConfig fields that do not change the numbers


def _evaluated(folder: Path, cfg: EvalConfig) -> dict | None:
    """The cell's evaluation record if it exists and was made with these settings (up to those that
    change how, not what, is computed)."""
    path = folder / EVAL_FILE
    if path.is_file():
        record = read_json(path)
        same = {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}
        if {k: v for k, v in (record.get("eval_config") or {}).items() if k not in SPEED_ONLY} == same:
            return record
    return None


def _site(train: TrainConfig) -> SiteOptions:
    """The model site the sweep trains on, for extra runs that do not name theirs."""
    if train.cache:
        m = read_manifest(Path(train.cache))
        return SiteOptions(model=m["model"], module_path=m.get("module_path"), model_dtype=m.get("model_dtype", "fp32"))
    return SiteOptions(model=train.model, module_path=train.module_path, model_dtype=train.model_dtype)


def _train(cells: list[TrainConfig], progress: bool) -> None:
    for i, cell in enumerate(cells):
        if (Path(cell.out) / "final" / "model.safetensors").exists():
            continue
        if progress:
            print(f"cell {i + 1}/{len(cells)}: {Path(cell.out).relative_to(Path(cell.out).parent.parent)}", flush=True)
        Trainer(cell, progress=progress).train()
        write_model_card(cell.out)


def select_lr(cfg: SweepConfig, progress: bool = True) -> dict[tuple, float]:
    """Train the learning-rate grid; {(layer, method, seed): the multiplier with the lowest final validation nmse}."""
    grid = cfg.grid_cells()
    _train(list(grid.values()), progress)
    best: dict[tuple, tuple[float, float]] = {}
    for (layer, method, seed, mult), cell in grid.items():
        nmse = final_val_nmse(Path(cell.out))
        if (layer, method, seed) not in best or nmse < best[(layer, method, seed)][0]:
            best[(layer, method, seed)] = (nmse, mult)
    chosen = {key: mult for key, (_, mult) in best.items()}
    (Path(cfg.train.out) / "lr-grid" / "selection.json").write_text(json.dumps(
        [{"layer": layer, "method": method, "seed": seed, "lr_multiplier": mult, "val_nmse": best[(layer, method, seed)][0],
          "grid": {f"{m:g}": final_val_nmse(Path(grid[(layer, method, seed, m)].out)) for m in cfg.lr_grid}}
         for (layer, method, seed), mult in chosen.items()], indent=1) + "\n")
    return chosen


def read_selection(cfg: SweepConfig) -> dict[tuple, float]:
    """{(layer, method, seed): multiplier} from cfg.lr_selection; ValueError naming the file when it
    lacks one of the sweep's (layer, method, seed) cells."""
    records = read_json(cfg.lr_selection)
    try:
        chosen = {(r["layer"], r["method"], r["seed"]): float(r["lr_multiplier"]) for r in records}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg.lr_selection} is not a selection.json of mxd sweep ({type(e).__name__}: {e})") from None
    missing = [key for key in cfg.grid_keys() if key not in chosen]
    if missing:
        raise ValueError(f"{cfg.lr_selection} chooses no learning rate for (layer, method, seed) {missing}")
    return chosen


def run_sweep(cfg: SweepConfig, progress: bool = True) -> list[dict]:
    """Select learning rates (with lr_grid), train the missing cells, evaluate the unevaluated ones
    together with the extra runs, write frontier.json; its records."""
    out = Path(cfg.train.out)
    sweep_file = out / "sweep.json"
    if sweep_file.exists():
        before = read_json(sweep_file)
        diffs = config_differences(before["train"], asdict(cfg.train))
        if diffs:
            raise ValueError(f"{out} holds a sweep with other training settings (differs in: {', '.join(diffs)}); "
                             f"choose another --out")
    extra = [read_run(p, site=_site(cfg.train)) for p in cfg.extra_runs]  # fail on a bad extra run before training
    given = read_selection(cfg) if cfg.lr_selection else None  # and on a selection that does not fit
    out.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    chosen, from_grid = (given, False) if given else ((select_lr(cfg, progress) if cfg.lr_grid else None), True)
    cells = cfg.cells(chosen, from_grid)
    _train(cells, progress)
    todo = [read_run(c.out) for c in cells if _evaluated(Path(c.out), cfg.eval) is None]
    todo += [run for run in extra if _evaluated(run.path, cfg.eval) is None]
    if todo:
        data = read_run(cells[0].out).data  # the cells' text source, also for extra runs evaluated alone
        write_results(evaluate_runs(todo, cfg.eval, progress=progress, data=data), todo, None)
    paths = [Path(c.out) for c in cells] + [run.path for run in extra]
    records = sorted((_evaluated(p, cfg.eval) for p in paths), key=lambda r: (r["layer"], r["method"], r["k"], r["seed"] or 0))
    (out / FRONTIER).write_text(json.dumps(records, indent=1) + "\n")
    (out / "frontier.md").write_text(markdown_table(records) + "\n")
    return records
