"""One-line ValueErrors for config fields, shared by every config dataclass."""

from __future__ import annotations


def check_at_least(config, minimum: int, *names: str) -> None:
    """Raise naming the first field of `config` among `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name}={value} is invalid: must be >= {minimum}")
