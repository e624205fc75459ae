"""How often latents fire, summarised as the metrics every evaluation reports (docs/metrics.md).

    firing_metrics(counts, n_tokens)   # counts [n_latents]: tokens on which each latent fired

- dead: share of latents that never fired;
- dense: share of latents that fired on more than 10% of the tokens;
- always_on_slots: Σ over latents firing on more than 50% of the tokens of their firing rate, i.e.
  the mean slots per token those latents take;
- effective_l0: l0 − always_on_slots, the slots per token left to token-specific latents.
"""

from __future__ import annotations

from torch import Tensor

DENSE_RATE = 0.1  # a latent firing on more than this share of tokens is "dense"
ALWAYS_ON_RATE = 0.5  # ... and on more than this share, "always on"


def firing_metrics(counts: Tensor, n_tokens: int) -> dict:
    """dead, dense, always_on_slots, l0 and effective_l0 from per-latent firing counts over n_tokens
    tokens (dead and dense are None for a layer without latents)."""
    rate = counts.double() / max(n_tokens, 1)
    always_on = rate[rate > ALWAYS_ON_RATE].sum().item()
    l0 = rate.sum().item()
    n = len(rate)
    return {"dead": (rate == 0).sum().item() / n if n else None, "dense": (rate > DENSE_RATE).sum().item() / n if n else None,
            "always_on_slots": always_on, "l0": l0, "effective_l0": l0 - always_on}
