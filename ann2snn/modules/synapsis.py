"""Synapsis: the spiking replacement of `nn.Linear`.

A Synapsis is an input neuron layer (one `SignedNeuron` per input feature)
followed by its synaptic weights. In step mode the weights are driven only by
spikes: each step's ternary spikes select weight columns to add or subtract,
and the step's weight w_t (a power of two for the phase code) is a shift:

    out = Σ_t w_t · (s_t @ (W·diag(Δ))ᵀ) + b

W·diag(Δ) folds the neuron's per-channel step into the weights once, so no
activation value is ever multiplied. The synaptic weights are their own
submodule so that tests (and users) can hook exactly what reaches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..coding import SpikeCode
from .neuron import SignedNeuron, SpikeTrain


class SynapticWeights(nn.Module):
    """W and b of a Synapsis; accepts a spike train (step mode) or a dense value."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        # The Linear's own parameters, not copies: a converted model never holds the weights twice.
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor | SpikeTrain) -> torch.Tensor:
        if not isinstance(x, SpikeTrain):
            return F.linear(x, self.weight, self.bias)
        folded = self.weight * x.step.reshape(-1)  # W·diag(Δ): Δ broadcast over output rows
        per_step = torch.matmul(x.spikes, folded.t())  # ternary spikes select ± columns
        shifts = x.weights.to(per_step.dtype).reshape((-1,) + (1,) * (per_step.dim() - 1))
        out = (per_step * shifts).sum(0)
        return out if self.bias is None else out + self.bias


class Synapsis(nn.Module):
    """Spiking `nn.Linear`: input neurons with calibrated steps, then synaptic weights."""

    def __init__(self, linear: nn.Linear, code: SpikeCode, step: torch.Tensor | None = None, neuron: nn.Module | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.neuron = neuron if neuron is not None else SignedNeuron(code, linear.in_features, step)
        self.synapse = SynapticWeights(linear.weight, linear.bias)
        self.output_neuron: nn.Module | None = None  # only the braintransformers baseline quantises outputs

    @property
    def weight(self) -> nn.Parameter:
        return self.synapse.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.synapse.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.synapse(self.neuron(x))
        if self.output_neuron is None:
            return out
        encoded = self.output_neuron(out)
        return encoded.accumulate() if isinstance(encoded, SpikeTrain) else encoded
