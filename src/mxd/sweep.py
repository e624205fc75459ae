"""A grid of parameter-matched runs (methods × K × seeds, and layers) trained from one source and
evaluated together, collected in `frontier.json` (`mxd sweep`).

    SWEEP/sweep.json                         the SweepConfig
    SWEEP/{method}-k{K}-seed{S}/             one run folder per cell (layer{L}- prefixed with several layers)
    SWEEP/frontier.json, frontier.md         one record per cell (see mxd.evaluate)

Every cell has the parameter budget of a transcoder of width expansion × d_in (MxD's expert count
is derived from it). Rerunning resumes: finished cells are not retrained, evaluated cells are not
re-evaluated, half-trained cells continue from their newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mxd.evaluate import EVAL_FILE, EvalConfig, evaluate_runs, markdown_table, write_results
from mxd.runs import read_run
from mxd.train import KINDS, Trainer, TrainConfig

FRONTIER = "frontier.json"


@dataclass
class SweepConfig:
    """A sweep; its folder is the training config's out, its K axis the training config's ks.

    methods: layer kinds in the grid (mxd, transcoder, skip_transcoder); seeds: one cell per seed
    """

    train: TrainConfig
    methods: list[str] = field(default_factory=lambda: list(KINDS))
    seeds: list[int] = field(default_factory=lambda: [0])
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if isinstance(self.eval, dict):
            self.eval = EvalConfig(**self.eval)
        bad = [m for m in self.methods if m not in KINDS]
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} is invalid: give distinct values among {', '.join(KINDS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} is invalid: give distinct seeds")

    def cells(self) -> list[TrainConfig]:
        """One training config per cell, its out a subfolder of the sweep folder."""
        t, out = self.train, Path(self.train.out)
        layers, ks = t.layers or [None], t.ks or [t.sparse.k]
        cells = []
        for layer in layers:
            prefix = f"layer{layer}-" if len(layers) > 1 else ""
            for k in ks:  # all methods at one K before the next K: an interrupted sweep still compares
                for method in self.methods:
                    for seed in self.seeds:
                        folder = out / f"{prefix}{method}-k{k}-seed{seed}"
                        cells.append(replace(t, out=str(folder), layers=None if layer is None else [layer], ks=None, seed=seed,
                                             sparse=replace(t.sparse, kind=method, k=k),
                                             resume=(folder / "config.json").exists()))
        return cells


def _evaluated(folder: Path, cfg: EvalConfig) -> dict | None:
    """The cell's evaluation record if it exists and was made with these settings."""
    path = folder / EVAL_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("eval_config") == asdict(cfg):
            return record
    return None


def run_sweep(cfg: SweepConfig, progress: bool = True) -> list[dict]:
    """Train the missing cells, evaluate the unevaluated ones together, write frontier.json; its records."""
    out = Path(cfg.train.out)
    sweep_file = out / "sweep.json"
    if sweep_file.exists():
        before = json.loads(sweep_file.read_text())
        if before["train"] | {"resume": None} != asdict(cfg.train) | {"resume": None}:
            diffs = [k for k, v in asdict(cfg.train).items() if k != "resume" and before["train"].get(k) != v]
            raise ValueError(f"{out} holds a sweep with other training settings (differs in: {', '.join(diffs)}); "
                             f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    cells = cfg.cells()
    for i, cell in enumerate(cells):
        if (Path(cell.out) / "final" / "model.safetensors").exists():
            continue
        if progress:
            print(f"cell {i + 1}/{len(cells)}: {Path(cell.out).name}", flush=True)
        Trainer(cell, progress=progress).train()
    todo = [Path(c.out) for c in cells if _evaluated(Path(c.out), cfg.eval) is None]
    if todo:
        write_results(evaluate_runs([read_run(p) for p in todo], cfg.eval, progress=progress), None)
    records = sorted((_evaluated(Path(c.out), cfg.eval) for c in cells), key=lambda r: (r["layer"], r["method"], r["k"], r["seed"]))
    (out / FRONTIER).write_text(json.dumps(records, indent=1) + "\n")
    (out / "frontier.md").write_text(markdown_table(records) + "\n")
    return records
