"""Threshold rules: from a site's statistics to each channel's clip (and so its step Δ = clip / L).

- ``max``: the largest |x| seen; nothing clips, coarse steps when a channel has outliers.
- ``percentile``: the 99.9th percentile of |x|; outliers clip.
- ``mse``: per channel, the clip in a grid of fractions of the max that minimises
  the mean squared quantisation error of the reservoir sample at the recipe's
  coding and T — the trade between clipping error and rounding error.
"""

from __future__ import annotations

import torch

from ..coding import SpikeCode
from ..errors import ConfigError

THRESHOLD_RULES = ("max", "percentile", "mse")
MIN_CLIP = 1e-8  # a channel that never fired still needs a positive step


def choose_clip(stats: dict[str, torch.Tensor], rule: str, code: SpikeCode) -> torch.Tensor:
    if rule == "max":
        clip = stats["absmax"]
    elif rule == "percentile":
        clip = torch.minimum(stats["p99.9"], stats["absmax"])
    elif rule == "mse":
        clip = mse_clip(stats["sample"], stats["absmax"], code)
    else:
        raise ConfigError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    return clip.clamp_min(MIN_CLIP)


def mse_clip(sample: torch.Tensor, absmax: torch.Tensor, code: SpikeCode, grid: int = 48) -> torch.Tensor:
    """Per-channel clip minimising E[(x − Q(x))²] over the sample, searched on fractions of absmax."""
    absmax = absmax.clamp_min(MIN_CLIP)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for fraction in torch.linspace(1.0, 0.05, grid):
        clip = absmax * fraction
        err = (code.quantise(sample, code.step_size(clip)) - sample).pow(2).mean(0)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best
