"""The signed spiking neuron every SNN module of ann2snn is built on.

`SignedNeuron` holds a static, calibrated quantisation step Δ per channel (its
threshold at step t is w_t·Δ, see `ann2snn.coding`). Nothing is re-derived per
call, so one sample's spikes never depend on another sample in the batch.

Schedule. A neuron first integrates its whole input window (the summed
synaptic current of the stage before it), then fires for T steps, as the
few-spike neurons of Stöckl & Maass (2021) and PhaseSNN do; stages are
pipelined, so each spiking stage adds T steps of latency but throughput stays
one window per T steps. At step t the membrane v (in units of Δ) fires

    s_t = +1 if v ≥ θ_t,   −1 if v < −θ_t,   else 0;   then v ← v − s_t·w_t

(reset by subtraction), with the firing threshold θ_t = ¾·w_t for w_t ≥ 2 and
½ for w_t = 1 (`SpikeCode.firing_thresholds`). The −1 branch is the corrective
spike of the other sign that SpikeZIP-TF's ST-BIF neuron (spikingjelly's
`STBIFNode`) uses against over-firing; with it the count Σ s_t w_t always
equals the quantised input `SpikeCode.quantise_counts` — no temporal error —
which tests check for both codings. Why θ_t = ¾·w_t: any θ_t in [½, w_t − ½]
keeps the count exact (see `SpikeCode.firing_thresholds`), and ¾·w_t sends each
count with the fewest spikes (5 as +4 +1, not +8 −4 +2 −1 as θ_t = ½·w_t would).
spikingjelly's `STBIFNode` is not used directly because it holds one scalar
threshold and a rate code only; this neuron needs per-channel steps and
per-step weights.

State. Each call is one whole window: the membrane lives only inside `fire`,
and nothing of an activation's size is kept between calls. So the neuron is a
plain `nn.Module`, not one of spikingjelly's memory modules (there is no state
to reset between sequences). The one exception is short-lived: a neuron read by
several Synapsis (q/k/v, gate/up: `readers` > 1) hands the train it fired to
the readers after the first (`take_sent`) and drops it when the last has taken it.

Modes (see `set_simulation`):
- ``"step"``: fire step by step and return a `SpikeTrain`;
- ``"fast"``: return the accumulated value k·Δ directly (the same number, without
  stepping: every consumer of a spike train is linear in it, so this is exact);
- ``"ann"``: spiking off, the input passes unchanged (the ANN the SNN came from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..coding import SpikeCode

SIMULATIONS = ("step", "fast", "ann")


@dataclass
class SpikeTrain:
    """T steps of ternary spikes and what one spike is worth.

    spikes: [T, *shape], values in {−1, 0, +1}.
    weights: [T], w_t of the coding (1 for rate, 2^(T−1−t) for phase).
    delta: Δ per channel, broadcastable to shape.
    A +1 spike at step t is worth w_t·Δ.
    """

    spikes: torch.Tensor
    weights: torch.Tensor
    delta: torch.Tensor

    @property
    def timesteps(self) -> int:
        return self.spikes.shape[0]

    def _per_step(self) -> torch.Tensor:
        return self.weights.reshape((-1,) + (1,) * (self.spikes.dim() - 1)).to(self.spikes.dtype)

    def values(self) -> torch.Tensor:
        """Per-step values s_t·w_t·Δ, [T, *shape]."""
        return self.spikes * (self._per_step() * self.delta)

    def counts(self) -> torch.Tensor:
        """Σ_t s_t·w_t: the integer each neuron's spikes sum to."""
        if self.spikes.dtype in (torch.float32, torch.float64):
            # one pass over the train (w @ spikes); every partial sum is an integer below 2^24, so exact
            weights = self.weights.to(device=self.spikes.device, dtype=self.spikes.dtype)
            return torch.matmul(weights, self.spikes.reshape(self.timesteps, -1)).reshape(self.spikes.shape[1:])
        return (self.spikes * self._per_step()).sum(0)

    def accumulate(self) -> torch.Tensor:
        """Σ_t s_t·w_t·Δ: what the train carries over its window."""
        return self.counts() * self.delta

    def widened(self, steps: int) -> "SpikeTrain":
        """The same train in a window of `steps` ≥ T steps, the added steps silent and in front: the
        phase code's range steps come first, so two trains of unequal windows then end together."""
        extra = steps - self.timesteps
        if extra == 0:
            return self
        silent = self.spikes.new_zeros((extra,) + tuple(self.spikes.shape[1:]))
        return SpikeTrain(torch.cat((silent, self.spikes)), torch.cat((self.weights.new_zeros(extra), self.weights)), self.delta)

    def map(self, fn) -> "SpikeTrain":
        """Apply a shape op (transpose, repeat) that acts on trailing dims to spikes and steps alike."""
        delta = self.delta.expand(self.spikes.shape[1:])
        return SpikeTrain(fn(self.spikes), self.weights, fn(delta.unsqueeze(0)).squeeze(0))


class SignedNeuron(nn.Module):
    """Signed integrate-and-fire neuron with a static per-channel step Δ.

    `delta` has one entry per channel of the input's last dimension (or one
    entry for a per-tensor step); a tuple `channels` lets attention neurons
    hold one step per (head, head_dim) channel.
    """

    def __init__(self, code: SpikeCode, channels: int | tuple[int, ...], delta: torch.Tensor | None = None):
        super().__init__()
        self.code = code
        shape = (channels,) if isinstance(channels, int) else tuple(channels)
        self.register_buffer("delta", torch.ones(shape) if delta is None else delta.detach().float().clone().reshape(shape))
        self.register_buffer("weights", code.step_weights(), persistent=False)
        self.register_buffer("firing_thresholds", code.firing_thresholds(), persistent=False)
        self.simulation = "fast"
        self.readers = 1  # Synapsis reading this neuron's output (q/k/v share one: replace.py)
        self._sent = None  # (input, output, readers still to take it), only while readers > 1 and some have not read

    def recode(self, code: SpikeCode, delta: torch.Tensor) -> None:
        """Fire with `code` and step `delta` from now on (the level allocation tries a site at several T)."""
        self.code = code
        self.delta = delta.detach().to(self.delta).reshape(self.delta.shape)
        self.weights = code.step_weights().to(self.weights.device)
        self.firing_thresholds = code.firing_thresholds().to(self.firing_thresholds.device)

    def extra_repr(self) -> str:
        shared = f", readers={self.readers}" if self.readers > 1 else ""
        return f"code={self.code.name}, T={self.code.timesteps}, channels={tuple(self.delta.shape)}, simulation={self.simulation}{shared}"

    def forward(self, x: torch.Tensor) -> torch.Tensor | SpikeTrain:
        if self.simulation == "ann":
            out = x
        elif self.simulation == "fast":
            out = self.code.quantise(x, self.current_delta(x))
        else:
            out = self.fire(x, self.current_delta(x))
        self._sent = (x, out, self.readers - 1) if self.readers > 1 else None
        return out

    def take_sent(self, x: torch.Tensor) -> torch.Tensor | SpikeTrain | None:
        """What this neuron sent for the very tensor `x`, if a reader has yet to take it; else None.

        A neuron shared by several Synapsis fires once per input: the first
        reader calls it, the others take the same train here (one spike train
        fanned out to several synapse arrays). The last reader's take drops
        it, so no activation outlives the forward pass.
        """
        if self._sent is None or self._sent[0] is not x:
            return None
        _, out, left = self._sent
        self._sent = (x, out, left - 1) if left > 1 else None
        return out

    def current_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta.to(x.device)

    def fire(self, x: torch.Tensor, delta: torch.Tensor) -> SpikeTrain:
        """Integrate x, then fire T steps; returns the spike train.

        The loop runs over time steps only, vectorised over every neuron, and
        works in place: the membrane is one local buffer and each step's spikes
        are written straight into their slice of the [T, *shape] output, with
        the comparisons of the rule above (so ties at exactly ±θ_t go as stated).
        Spikes carry no gradient: the membrane is built from x.detach().
        """
        weights = self.weights.to(x.device)
        dtype = torch.promote_types(x.dtype, torch.float32)
        v = x.detach().to(dtype) / delta.detach().to(dtype)  # membrane in units of Δ, as SpikeCode.quantise_counts
        spikes = torch.empty((weights.numel(),) + tuple(v.shape), dtype=dtype, device=v.device)
        negative = torch.empty_like(v)
        for t, (w, theta) in enumerate(zip(weights.tolist(), self.firing_thresholds.tolist())):
            s = spikes[t]
            if w <= 0:  # a zero-weight step stays silent
                s.zero_()
                continue
            torch.ge(v, theta, out=s)  # +1 where v ≥ θ_t
            torch.lt(v, -theta, out=negative)  # −1 where v < −θ_t
            s.sub_(negative)
            v.sub_(s, alpha=w)  # reset by subtraction: v ← v − s·w (s·w is exact)
        return SpikeTrain(spikes.to(x.dtype), weights, delta.to(x.dtype))


class DynamicNeuron(SignedNeuron):
    """The BrainTransformers reference's neuron: one step per call, max|x|/L over the whole tensor.

    Reproduced only for the `braintransformers` baseline recipe: every sample of
    a batch shares the scale, so one sample's spikes depend on the others'.
    """

    def __init__(self, code: SpikeCode):
        super().__init__(code, ())

    def current_delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.detach().abs().amax().float() / self.code.max_count).clamp_min(1e-12)


def set_simulation(model: torch.nn.Module, simulation: str) -> None:
    """Switch every spiking module of `model` to 'step', 'fast' or 'ann'."""
    if simulation not in SIMULATIONS:
        raise ValueError(f"simulation must be one of {SIMULATIONS}, got {simulation!r}")
    for module in model.modules():
        if hasattr(module, "simulation"):
            module.simulation = simulation
