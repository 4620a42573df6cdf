"""SNNSiLU: SiLU over spikes, without the reference's saturation.

The input (the gate projection's output current) is encoded by a `SignedNeuron`
whose clip is the calibrated max of that input, so every calibrated value is
representable. The output is SiLU read at the neuron's level: a staircase of
threshold neurons whose steps sit on the input neuron's levels k·Δ, which is
SiLU(k·Δ) for the spike count k. Over the calibrated range |x| ≤ clip:

    |SNNSiLU(x) − SiLU(x)| ≤ max|SiLU'| · Δ/2 = 1.0998 · Δ/2,

since the neuron rounds x to the nearest level (tested against
`torch.nn.functional.silu`). The staircase table itself is listed among the
operations that stay in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..coding import SpikeCode
from .neuron import SignedNeuron, SpikeTrain

SILU_MAX_SLOPE = 1.0998  # max of d/dx x·σ(x), reached near x = 2.4


class SNNSiLU(nn.Module):
    def __init__(self, code: SpikeCode, channels: int, delta: torch.Tensor | None = None):
        super().__init__()
        self.neuron = SignedNeuron(code, channels, delta)

    def error_bound(self) -> torch.Tensor:
        """Largest |SNNSiLU − SiLU| per channel over the calibrated range."""
        return SILU_MAX_SLOPE * self.neuron.delta / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.neuron(x)
        level = encoded.accumulate() if isinstance(encoded, SpikeTrain) else encoded
        return F.silu(level)
