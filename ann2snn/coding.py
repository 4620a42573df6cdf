"""Spike codings: how T steps of signed spikes carry one value.

A coding fixes, for each step t of a window of T steps, the weight w_t of a
spike fired at that step, in units of the channel's quantisation step Δ.
A neuron fires s_t ∈ {−1, 0, +1} per step, so after the window it has sent

    Σ_t s_t · w_t · Δ

and the values it can send are the integers k·Δ with |k| ≤ L = Σ_t w_t.
Levels, not steps, set the error, so the two codings differ by far at equal T:

- **rate**: every spike weighs the same (w_t = 1): 2T+1 levels in T steps.
  This is the signed integrate-and-fire neuron of SpikeZIP-TF and of the paper.
- **phase**: the spike at step t weighs 2^(T−1−t) (most significant first, the
  binary phase code of PhaseSNN / few-spike neurons): 2^(T+1)−1 levels. At most
  23 steps carry weight (2^24 levels, float32's exact-integer range); in a
  longer window the later steps stay silent.

**Range steps** (phase only): `with_range_steps(k)` puts k more steps in front of
the window, weighted 2^(T+k−1) … 2^T. Δ stays (at most) what the T-step code gives
the clip — `delta_for` is 2^k·clip/L —, so values inside the clip are resolved as
before, and the neuron can also send values up to 2^k × the clip.
For ordinary values those high-order steps stay silent: they cost latency (k
steps at that site) and almost no spikes. A window capped at 23 weighted steps
gets the rest of its range from a coarser Δ instead (as a headroom would).


A spike at step t is worth ±w_t·Δ (the weighting is a shift for the phase
code); the neuron fires it when its membrane reaches the *firing threshold*
θ_t·Δ (`firing_thresholds`: ¾·w_t, or ½ where w_t = 1).

`quantise` is the fake-quantised value the spiking neuron reaches after its
window (round half up onto the grid, clamped to ±L): the SNN's accumulated
output equals it exactly (tested), which splits the SNN's error into
quantisation error (this function) and temporal error (none, see neuron.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class SpikeCode:
    """A signed spike code over `timesteps` steps; see the module docstring."""

    name: str
    timesteps: int  # the window: every step the neuron fires in, range steps included
    range_steps: int = 0  # doublings of the largest value above the clip (module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps <= 0:
            raise ConfigError(f"timesteps must be a positive integer, got {self.timesteps!r}")
        if self.name not in CODINGS:
            raise ConfigError(f"unknown coding {self.name!r}; choose one of {', '.join(CODINGS)}")
        if isinstance(self.range_steps, bool) or not isinstance(self.range_steps, int) or self.range_steps < 0:
            raise ConfigError(f"range steps must be a non-negative integer, got {self.range_steps!r}")
        if self.range_steps and self.name != "phase":
            raise ConfigError("range steps need the phase code (a rate step adds one Δ of range, not a doubling)")

    def with_range_steps(self, k: int) -> "SpikeCode":
        """This code with k high-order steps in front: the same Δ for a clip, 2^k × the clip as largest value.
        The window grows by k steps while it stays within 23 weighted steps (past that, Δ coarsens instead)."""
        if k == 0:
            return self
        window = max(self.timesteps, min(self.timesteps + k, MAX_PHASE_STEPS))
        return SpikeCode(self.name, window, self.range_steps + k)

    def step_weights(self) -> torch.Tensor:
        """w_t for t = 0..T-1, as float32 integers."""
        t = torch.arange(self.timesteps, dtype=torch.float32)
        if self.name == "rate":
            return torch.ones_like(t)
        # Steps past the 23rd stay silent (weight 0): 2^24 levels is float32's exact-integer range.
        return torch.where(t < self.weighted_steps, torch.pow(2.0, self.weighted_steps - 1 - t), torch.zeros_like(t))

    def firing_thresholds(self) -> torch.Tensor:
        """θ_t for t = 0..T-1 (float32): ¾·w_t where w_t ≥ 2, ½ where w_t = 1 (0 where w_t = 0: silent).

        Exactness: the steps after t can still send any integer up to R_t =
        Σ_{s>t} w_s, and round a residual v onto it if −R_t − ½ ≤ v < R_t + ½.
        With the phase code R_t = w_t − 1, so before step t that range is
        [−2w_t + ½, 2w_t − ½), and firing +1 at v ≥ θ_t, −1 at v < −θ_t keeps the
        residual in the next step's range for any θ_t in [½, w_t − ½]; a residual
        beyond the whole range fires every step with its sign (the clamp to ±L).
        The rate code (w_t = 1) allows only θ_t = ½. Within the interval,
        θ_t = ¾·w_t sends every count with the fewest spikes that any train of
        signed spikes with these weights can (the minimal-weight signed-digit
        form: 5 goes as +4 +1, where θ_t = ½·w_t sends +8 −4 +2 −1). Both are
        tested: exactness for every T ≤ 23, minimality against all 3^T trains.
        """
        weights = self.step_weights()
        return torch.where(weights >= 2, 0.75 * weights, 0.5 * weights)

    @property
    def weighted_steps(self) -> int:
        """Steps whose spikes carry weight: all T for rate, at most 23 for phase."""
        return self.timesteps if self.name == "rate" else min(self.timesteps, MAX_PHASE_STEPS)

    @property
    def max_count(self) -> int:
        """L: the largest |Σ_t s_t w_t|, in units of Δ."""
        return self.timesteps if self.name == "rate" else 2**self.weighted_steps - 1

    @property
    def levels(self) -> int:
        return 2 * self.max_count + 1

    def delta_for(self, clip: torch.Tensor) -> torch.Tensor:
        """Δ for a channel whose values are clipped to ±clip (with range steps: sent up to ±2^range_steps·clip)."""
        return clip * 2**self.range_steps / self.max_count

    def quantise_counts(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """k = clamp(floor(x/Δ + 1/2), −L, L): the integer the neuron's spikes sum to.

        Computed as floor(u) + [u − floor(u) ≥ 1/2]: the fraction is exact in float
        (Sterbenz) where it matters, whereas u + 1/2 rounds up for u one float step
        below 1/2 — where the neuron, comparing v ≥ 1/2, stays silent.
        """
        dtype = _working_dtype(x)
        u = x.to(dtype) / delta.to(dtype)
        whole = torch.floor(u)
        return torch.clamp(whole + (u - whole >= 0.5).to(dtype), -self.max_count, self.max_count)

    def quantise(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The fake-quantised value k·Δ, in x's dtype."""
        return (self.quantise_counts(x, delta) * delta.to(_working_dtype(x))).to(x.dtype)


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 activations are rounded to levels in float32."""
    return torch.promote_types(x.dtype, torch.float32)


CODINGS = ("rate", "phase")
MAX_PHASE_STEPS = 23
