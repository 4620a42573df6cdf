"""Synapsis: the spiking replacement of `nn.Linear`.

A Synapsis is an input neuron layer (one `SignedNeuron` per input feature)
followed by its synaptic weights. Synapsis that read the same tensor with the
same Δ (q/k/v after one RMSNorm, gate/up after another) share one input
neuron, which fires once and fans its train out to each (`replace.py`). In step mode the weights are driven only by
spikes: each step's ternary spikes select weight columns to add or subtract,
and the step's weight w_t (a power of two for the phase code) is a shift:

    out = Σ_t w_t · (s_t @ (W·diag(Δ))ᵀ) + b

W·diag(Δ) folds the neuron's per-channel step into the weights, so no
activation value is ever multiplied. The synaptic weights are their own
submodule so that tests (and users) can hook exactly what reaches them.

Cost. The step's Δ enters each product W_oc·Δ_c·s_c once, on whichever side
touches fewer numbers: folded into W (out × in numbers, per call) when many
tokens go through, or onto the spikes as their ±Δ (T × tokens × in numbers)
when few do (token-by-token generation), so neither prefill nor generation pays
for a weight-sized copy it does not need. Nothing is cached, so a weight or Δ
changed by fine-tuning is always the one used. With many tokens (float32/64)
the T products accumulate in place, one GEMM per step with the shift w_t as its
scale; otherwise one GEMM runs over the stacked steps and the shifts sum them.
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
        spikes = x.spikes.reshape(x.timesteps, -1, x.spikes.shape[-1])  # [T, tokens, in]
        steps, rows = x.timesteps, spikes.shape[1]
        delta = x.delta.reshape(-1)
        fold = steps * rows >= self.weight.shape[0]  # Δ into W (out·in numbers) or onto the spikes (T·rows·in)
        if fold:
            weight = self.weight * delta  # W·diag(Δ): Δ broadcast over output rows
        else:
            spikes, weight = spikes * delta, self.weight  # few tokens: each spike becomes ±Δ_c or 0
        if fold and spikes.dtype in (torch.float32, torch.float64):
            shifts = x.weights.tolist()
            weight = weight.t()
            out = torch.mm(spikes[0], weight)  # ternary spikes select ± columns
            if shifts[0] != 1:
                out.mul_(shifts[0])
            for t in range(1, steps):
                if shifts[t] != 0:  # a zero-weight step is silent
                    out.addmm_(spikes[t], weight, alpha=shifts[t])
        else:  # one GEMM over the stacked steps, then the shifts sum them (in one rounding for bf16/fp16)
            per_step = torch.matmul(spikes, weight.t())  # [T, tokens, out]
            out = torch.matmul(x.weights.to(per_step.dtype).unsqueeze(0), per_step.reshape(steps, -1))
        out = out.reshape(x.spikes.shape[1:-1] + (self.weight.shape[0],))
        return out if self.bias is None else out + self.bias


class Synapsis(nn.Module):
    """Spiking `nn.Linear`: input neurons with calibrated steps, then synaptic weights."""

    def __init__(self, linear: nn.Linear, code: SpikeCode, delta: torch.Tensor | None = None, neuron: nn.Module | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.neuron = neuron if neuron is not None else SignedNeuron(code, linear.in_features, delta)
        self.synapse = SynapticWeights(linear.weight, linear.bias)
        self.output_neuron: nn.Module | None = None  # only the braintransformers baseline quantises outputs

    @property
    def weight(self) -> nn.Parameter:
        return self.synapse.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.synapse.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.neuron.take_sent(x)  # a shared input neuron fired already for this x (q/k/v, gate/up)
        out = self.synapse(self.neuron(x) if encoded is None else encoded)
        if self.output_neuron is None:
            return out
        encoded = self.output_neuron(out)
        return encoded.accumulate() if isinstance(encoded, SpikeTrain) else encoded
