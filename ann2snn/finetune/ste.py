"""A differentiable path through the spiking neurons, for gradient fine-tuning.

In ``"fast"`` simulation a `SignedNeuron` outputs the value its spikes add up to,

    x̂ = Q(x; Δ) = k·Δ,   k = clamp(⌊x/Δ + 1/2⌋, −L, L),

which is piecewise constant in x and so has no useful gradient. Here the same
forward value gets the straight-through (STE) / LSQ gradient (Esser et al.,
"Learned Step Size Quantization", 2020), with u = x/Δ:

    ∂x̂/∂x = 1 if −L ≤ u ≤ L, else 0          (identity inside the clip, zero outside)
    ∂x̂/∂Δ = k − u if −L ≤ u ≤ L, else k       (= round(u) − u inside, ±L outside)

The forward value is `SpikeCode.quantise` itself (not an approximation), so a
model under `differentiable_neurons` computes exactly what the spiking
simulation accumulates; only the backward pass differs.

Learnable thresholds. The per-channel quantisation step Δ (`delta`) of every calibrated neuron is
trained through its logarithm, Δ = exp(s): Δ stays positive, and an Adam step on
s changes Δ by a relative amount (≈ lr), the same for a channel with Δ = 1e-4 and
one with Δ = 1, so channels of very different scales learn at one rate. Adam's
per-parameter normalisation takes the place of LSQ's gradient scale 1/√(N·L)
(which would only rescale a gradient that Adam normalises anyway). The chain rule
gives ∂loss/∂s = Δ·∂loss/∂Δ.

The `SignedNeuron` class is not modified: `differentiable_neurons` gives each
neuron instance a temporary ``forward`` and ``current_delta`` (instance
attributes, found before the class methods) and a log-Δ parameter held
outside the module, and on exit writes Δ = exp(s) back into the neuron's
``delta`` buffer and removes the instance attributes. The model's state dict and
export format are never changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modules.attention import SNNSoftmax
from ..modules.neuron import DynamicNeuron, SignedNeuron

MIN_LOG_DELTA = -40.0  # Δ ≥ e^-40: a channel never collapses to a zero threshold


class STEQuantise(torch.autograd.Function):
    """x̂ = clamp(⌊x/Δ + 1/2⌋, −L, L)·Δ forward; the STE / LSQ gradients of the module docstring backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, max_count: int) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        delta_w = delta.to(dtype)
        k = torch.clamp(torch.floor(x.to(dtype) / delta_w + 0.5), -max_count, max_count)
        ctx.save_for_backward(x, delta)  # u and k are recomputed: one saved tensor per element, not two
        ctx.max_count = max_count
        return (k * delta_w).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, delta = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, torch.float32)
        u = x.to(dtype) / delta.to(dtype)
        k = torch.clamp(torch.floor(u + 0.5), -ctx.max_count, ctx.max_count)
        grad = grad_out.to(dtype)
        inside = (u >= -ctx.max_count) & (u <= ctx.max_count)
        grad_x = (grad * inside).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[1]:
            per_element = grad * torch.where(inside, k - u, k)
            grad_delta = per_element.sum_to_size(delta.shape).to(delta.dtype)
        return grad_x, grad_delta, None


def ste_quantise(x: torch.Tensor, delta: torch.Tensor, max_count: int) -> torch.Tensor:
    return STEQuantise.apply(x, delta, max_count)


def trainable_neuron(module: nn.Module) -> bool:
    """A neuron whose calibrated Δ is worth tuning.

    Excluded: `DynamicNeuron` (its Δ is re-derived from every input) and the
    SNNSoftmax neuron (its clip is exactly 1, the row maximum of the
    exponentials, by construction).
    """
    return isinstance(module, SignedNeuron) and not isinstance(module, DynamicNeuron)


def neurons(model: nn.Module) -> list[tuple[str, SignedNeuron]]:
    """Every (name, SignedNeuron) of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SignedNeuron)]


def calibrated_neurons(model: nn.Module, softmax: bool = False) -> list[tuple[str, SignedNeuron]]:
    """The neurons whose thresholds fine-tuning may change (see `trainable_neuron`).

    With `softmax`, also each SNNSoftmax neuron (one Δ per layer, 1/L at
    conversion: clip 1, the row maximum of the exponentials). Its clip is not
    calibrated, but it is still a threshold: a clip below 1 saturates the few
    largest exponentials of a row (the normaliser is the same saturated train,
    so each row still sums to 1) and gives the many small ones finer levels —
    at small T most of them would otherwise round to zero.
    """
    excluded = set() if softmax else {id(m.neuron) for m in model.modules() if isinstance(m, SNNSoftmax)}
    return [(name, m) for name, m in neurons(model) if trainable_neuron(m) and id(m) not in excluded]


@dataclass
class DifferentiableNeurons:
    """What `differentiable_neurons` yields: the log-Δ parameters, by neuron name."""

    log_deltas: dict[str, nn.Parameter]
    log_scales: dict[str, nn.Parameter] = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        """The per-channel log-steps s."""
        return list(self.log_deltas.values())

    def scale_parameters(self) -> list[nn.Parameter]:
        """The per-neuron log-scales g (empty unless `differentiable_neurons(..., scales=True)`)."""
        return list(self.log_scales.values())

    def steps(self) -> dict[str, torch.Tensor]:
        """Current Δ of every trained neuron (detached)."""
        return {name: _log_delta(p, self.log_scales.get(name)).detach().exp() for name, p in self.log_deltas.items()}


def _log_delta(log_delta: torch.Tensor, log_scale: torch.Tensor | None) -> torch.Tensor:
    return (log_delta if log_scale is None else log_delta + log_scale).clamp_min(MIN_LOG_DELTA)


def _differentiable_step(neuron: SignedNeuron, log_delta: nn.Parameter | None, log_scale: nn.Parameter | None):
    """Δ as the neuron's ``current_delta`` while it is differentiable: the trained exp(s + g), or its own."""
    fixed = neuron.current_delta

    def current_delta(x: torch.Tensor) -> torch.Tensor:
        if log_delta is None:
            return fixed(x).detach()
        return _log_delta(log_delta, log_scale).exp().to(x.device)

    return current_delta


def _differentiable_forward(neuron: SignedNeuron):
    def forward(x: torch.Tensor):
        if neuron.simulation == "ann":
            return x
        delta = neuron.current_delta(x)
        if neuron.simulation == "fast":
            return ste_quantise(x, delta, neuron.code.max_count)
        return neuron.fire(x, delta.detach())  # "step": the real spikes, at the current thresholds

    return forward


@contextlib.contextmanager
def differentiable_neurons(model: nn.Module, train_steps: bool = True, softmax: bool = False, scales: bool = False):
    """Make every SignedNeuron of `model` differentiable (STE) and, if `train_steps`, its Δ learnable.

    Yields a `DifferentiableNeurons`; its ``log_deltas`` (one float32 parameter
    per calibrated neuron — with `softmax` also per SNNSoftmax neuron, see
    `calibrated_neurons` — shaped like its ``delta`` buffer) go to the optimizer.
    With `scales`, each such neuron also gets one scalar log-scale g (starting
    at 0), and Δ = exp(s + g): g moves all of the neuron's channels together.
    On exit — also on an exception — each neuron's ``delta`` buffer receives
    exp(s + g) and its class ``forward`` is restored. A channel whose s and g
    are where they started keeps its Δ to the bit: exp(log Δ) is not always Δ
    in floating point, and a run that ends where it started (distill's early
    stopping when no evaluation beat the start) must hand back the same SNN.
    """
    trainable = {id(m) for _, m in calibrated_neurons(model, softmax)} if train_steps else set()
    log_deltas: dict[str, nn.Parameter] = {}
    log_scales: dict[str, nn.Parameter] = {}
    starts: dict[str, torch.Tensor] = {}  # each s as it started
    patched = []
    try:
        for name, neuron in neurons(model):
            param = scale = None
            if id(neuron) in trainable:
                param = nn.Parameter(neuron.delta.detach().float().clamp_min(1e-30).log())
                log_deltas[name] = param
                if scales:
                    scale = log_scales[name] = nn.Parameter(torch.zeros((), device=param.device))
                starts[name] = param.detach().clone()
            # instance attributes, found before the class's: readers of current_delta (SpikingAttention's
            # products in units of Δ) see the trained Δ too
            neuron.current_delta = _differentiable_step(neuron, param, scale)
            neuron.forward = _differentiable_forward(neuron)
            patched.append((name, neuron, param, scale))
        yield DifferentiableNeurons(log_deltas, log_scales)
    finally:
        with torch.no_grad():
            for name, neuron, param, scale in patched:
                if param is not None:
                    trained = _log_delta(param.detach(), None if scale is None else scale.detach()).exp()
                    unmoved = param.detach() == starts[name]
                    if scale is not None:
                        unmoved &= scale.detach() == 0
                    neuron.delta.copy_(torch.where(unmoved, neuron.delta, trained.to(neuron.delta)))
                neuron.__dict__.pop("forward", None)
                neuron.__dict__.pop("current_delta", None)
