"""Where training metrics go: always `metrics.jsonl` in the run folder, plus TensorBoard and/or
Weights & Biases when asked for (`--log-to tensorboard wandb`) and installed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from mxd.files import finite_or_none

TRACKERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Raise a clear ValueError for an unknown tracker or one whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"log_to={name!r} is invalid: valid values are {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"log_to={name} needs the {_PACKAGES[name]} package: pip install {_PACKAGES[name]} "
                             f"(or pip install 'mxd[tracking]')")


class MetricsLogger:
    """Appends each record to `out/metrics.jsonl` and mirrors its numbers to the asked-for trackers.

    A record is a flat dict with a "step" key; every other numeric value becomes a scalar series.
    metrics.jsonl stays strict JSON: a NaN or ±Inf is written as null.
    """

    def __init__(self, out: Path, trackers: list[str], run_config: dict):
        check_trackers(trackers)
        self.path = Path(out) / "metrics.jsonl"
        self.tensorboard = self.wandb_run = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))
        if "wandb" in trackers:
            import wandb

            # the run folder's name is the run's id, so a resumed run continues the same wandb run
            self.wandb_run = wandb.init(project="mxd", name=Path(out).name, id=_wandb_id(out), resume="allow",
                                        dir=str(out), config=run_config)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(out: Path) -> str:
    """A stable wandb run id for a run folder (wandb ids allow letters, digits, - and _)."""
    return hashlib.blake2b(str(Path(out).resolve()).encode(), digest_size=8).hexdigest()
