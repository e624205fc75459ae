"""Train the cells of `mxd sweep --config sweep.yaml` in W worker processes, each taking every W-th cell.

    OMP_NUM_THREADS=1 python experiments/smollm2-frontier/train_cells.py --worker 0 --of 2 &
    OMP_NUM_THREADS=1 python experiments/smollm2-frontier/train_cells.py --worker 1 --of 2 &
    wait; python -m mxd sweep --config experiments/smollm2-frontier/sweep.yaml   # evaluates, writes frontier.json

This is how the learning-rate grid of 2026-12-02 was trained. It is not faster than one
two-thread `mxd sweep` on this 2-core CPU (MxD grid cells: 2.9k + 2.5k tok/s for two one-thread
workers against 5.9k for one two-thread process), so prefer `mxd sweep` when nothing else runs.
The cells and their configs are exactly those of `mxd sweep` (built by
its own command-line parser from the same file); the learning-rate grid is trained first, then, once
every grid cell is finished, the selection is made (lr-grid/selection.json) and the remaining cells
are trained. `mxd sweep` afterwards finds them finished and only evaluates.
"""

import argparse
import time
from pathlib import Path

import mxd.cli as cli
from mxd.sweep import select_lr
from mxd.train import Trainer


def sweep_config(path: str):
    """The SweepConfig `mxd sweep --config path` would run."""
    captured = {}
    cli.COMMANDS["sweep"] = (cli.SweepConfig, lambda cfg: captured.setdefault("cfg", cfg), "")
    cli.main(["sweep", "--config", path])
    return captured["cfg"]


def train_share(cells, worker: int, of: int) -> None:
    for i, cell in enumerate(cells):
        if i % of == worker and not (Path(cell.out) / "final" / "model.safetensors").exists():
            print(f"worker {worker}: {cell.out}", flush=True)
            Trainer(cell, progress=True).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="experiments/smollm2-frontier/sweep.yaml")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--of", type=int, default=2)
    args = parser.parse_args()
    cfg = sweep_config(args.config)
    grid = list(cfg.grid_cells().values())
    train_share(grid, args.worker, args.of)
    while not all((Path(c.out) / "final" / "model.safetensors").exists() for c in grid):
        time.sleep(10)  # the other worker's grid cells
    chosen = select_lr(cfg, progress=False)  # every grid cell is trained: only reads and writes selection.json
    train_share(cfg.cells(chosen), args.worker, args.of)


if __name__ == "__main__":
    main()
