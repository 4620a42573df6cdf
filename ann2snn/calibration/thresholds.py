"""Threshold rules: from a site's statistics to each channel's clip (and so its step Δ = clip / L).

- ``max``: the largest |x| seen; nothing clips, coarse steps when a channel has outliers.
- ``percentile``: the 99.9th percentile of |x|; outliers clip.
- ``mse``: per channel, the clip between the 99.9th percentile and the max that
  minimises the expected squared quantisation error at the recipe's coding and
  T — the trade between clipping error and rounding error. The expectation
  weighs the reservoir sample (the bulk) and the channel's largest values (the
  tail, which a small sample misses but which carries the massive activations)
  by how many tokens each stands for.
"""

from __future__ import annotations

import math

import torch

from ..coding import SpikeCode
from ..errors import ConfigError

THRESHOLD_RULES = ("max", "percentile", "mse")
MIN_CLIP = 1e-8  # a channel that never fired still needs a positive step
# Range steps "auto" (coding.py): a site is heavy-tailed when some channel's max is at least this many
# times its 99.9th percentile; such tails are where unseen text goes far past the calibrated max (on
# Qwen2.5-0.5B down_proj's input: tails of 6–63× in calibration, held-out maxima up to 60× the calibrated).
HEAVY_TAIL = 4.0
MAX_RANGE_STEPS = 8


def choose_clip(stats: dict[str, torch.Tensor], rule: str, code: SpikeCode) -> torch.Tensor:
    if rule == "max":
        clip = stats["absmax"]
    elif rule == "percentile":
        clip = torch.minimum(stats["p99.9"], stats["absmax"])
    elif rule == "mse":
        clip = mse_clip(stats, code)
    else:
        raise ConfigError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    return clip.clamp_min(MIN_CLIP)


def mse_clip(stats: dict[str, torch.Tensor], code: SpikeCode, grid: int = 32) -> torch.Tensor:
    """Per-channel clip in [p99.9, max] minimising the token-weighted squared quantisation error."""
    absmax = stats["absmax"].clamp_min(MIN_CLIP)
    low = torch.minimum(stats["p99.9"], absmax)
    sample, top = stats["sample"], stats["top"]
    if sample.dtype in (torch.bfloat16, torch.float16):  # a 16-bit reservoir (exact values): errors in float32
        sample = sample.float()
    tokens = float(stats["tokens"])
    tail_weight = top.shape[0] / tokens  # the top values are this share of all tokens; the sample stands for the rest

    def error(clip):
        delta = code.delta_for(clip)
        bulk = (code.quantise(sample, delta) - sample).pow(2).mean(0)
        tail = (code.quantise(top, delta) - top).pow(2).mean(0)
        return (1 - tail_weight) * bulk + tail_weight * tail

    best, best_err = absmax.clone(), error(absmax)
    for fraction in torch.linspace(0.0, 1.0, grid + 1)[:-1]:
        clip = low + (absmax - low) * fraction
        err = error(clip)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best


def range_steps(stats: dict[str, torch.Tensor], option: str | int, code: SpikeCode) -> int:
    """High-order range steps for one site (coding.py): `option` steps, or for "auto" one more than
    log2 of the heaviest channel tail (max / 99.9th percentile) at heavy-tailed sites, else none."""
    if code.name != "phase":
        return 0
    if option != "auto":
        return int(option)
    tail = (stats["absmax"] / stats["p99.9"].clamp_min(MIN_CLIP)).max().item()
    return 0 if tail < HEAVY_TAIL else min(math.ceil(math.log2(tail)) + 1, MAX_RANGE_STEPS)
