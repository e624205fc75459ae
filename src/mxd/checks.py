"""One-line ValueErrors for config fields, shared by every config dataclass."""

from __future__ import annotations

from pathlib import Path


def check_at_least(config, minimum: int, *names: str) -> None:
    """Raise naming the first field of `config` among `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name}={value} is invalid: must be >= {minimum}")


def check_out(out: str, name: str = "out") -> None:
    """Raise unless `out` can name a folder to write: a non-empty path that is not an existing file."""
    if not isinstance(out, str) or not out.strip():
        raise ValueError(f"{name}={out!r} is invalid: give the folder to write (e.g. runs/mxd)")
    if Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ValueError(f"{name}={out!r} is invalid: it is a file, not a folder; give a folder path")


def check_device(device: str) -> None:
    """Raise unless this torch can use `device`: cpu, cuda, cuda:N (N < the GPU count) or mps."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is invalid: valid values are cpu, cuda, cuda:N, mps")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r} is unavailable: this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use device=cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device!r} is unavailable: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} is unavailable: MPS is not available here; use device=cpu")


def check_experts(experts: list[int], n_latents: int) -> None:
    """ValueError naming the first expert index outside 0..n_latents-1."""
    for e in experts:
        if not 0 <= e < n_latents:
            raise ValueError(f"expert {e} is out of range: the layer has {n_latents} experts (0..{n_latents - 1})")
