"""The BrainTransformers SiLU: a fixed staircase of spiking neurons (baseline only).

This reproduces, for the `braintransformers` baseline recipe, the SNN SiLU of
"BrainTransformers: SNN-LLM" (arXiv 2410.14687), as published in the public
repository LumenScopeAI/BrainTransformers-SNN-LLM, file
``transformers/models/braingpt/modeling_braingpt.py`` (classes
``CustomNeuronPositive``, ``CustomNeuronNegative``, ``SiLUPositiveApproximator``,
``SiLUNegativeApproximator``, ``SiLUApproximator``; the Qwen2 file next to it,
``transformers/models/qwen2/modeling_qwen2.py``, keeps the plain SiLU). Its
per-step pulse amplitudes are trained and shipped as ``model_pos.pth`` /
``model_neg.pth`` beside that file; `BrainGPTMLP` refuses to start without them,
so the function is those checkpoints, whose values are copied below (as data).
The code here is an independent implementation of the same maths.

The neurons. Each neuron is driven by a constant current u for T steps, with a
leaky membrane that is never reset,

    V_0 = 0,   V_t = λ·V_{t−1} + u   (so V_t = u·(1 + λ + … + λ^(t−1))),

and at step t it emits its trained pulse amplitude p_t whenever V_t ≥ θ. (Every
reference neuron also has a second, negative threshold with pulse −0.02 or
−0.005, but on the inputs each neuron is given V_t ≥ 0 and that threshold is
never reached.) A neuron's output is Σ_t p_t·[V_t ≥ θ]: since V_t grows with
both u and t, a larger input makes the neuron start firing earlier and collect
more of its pulses, so each neuron is a staircase with one stair per step.

The intervals (x is the SiLU input):

- x ≥ 0: drive u = x into three neurons whose outputs add up:
  two identical ones with θ = 0.3, λ = 0.95, T = 10 (pulses summing to
  0.1202 each; they start firing at x ≈ 0.0374 and all fire from x = 0.3) and
  one with θ = 5, λ = 1, T = 10 (V_t = t·x, so step t fires iff x ≥ 5/t: stairs
  at 0.5, 0.556, 0.625, 0.714, 0.833, 1, 1.25, 1.667, 2.5, 5; pulses summing to
  4.7266). From x = 5 on every pulse fires: the output saturates at
  2·0.1202 + 4.7266 = 4.9671 for every larger x (SiLU(x) ≈ x there). Just
  below 5 it is 3.6551.
- −2 ≤ x < 0: u = −x into one neuron with θ = 1, λ = 0.995, T = 20 and
  negative pulses (first fires at x ≈ −0.0525, all 20 fire from x = −1 on,
  giving −0.2668).
- −4 ≤ x < −2: u = −x, θ = 1, λ = 0.99, T = 10; u > θ, so all ten equal pulses
  fire: a constant −0.14662.
- −6 ≤ x < −4: u = −x, θ = 1, λ = 0.99, T = 5, likewise constant −0.036679.
- x < −6 (and NaN, which fails every interval test): 0.

Accuracy: its largest |error| against SiLU on [−6, 1] is 0.0918, just below
x = −2 (−0.1466 against SiLU(−2) = −0.2384); above 1 the error grows (0.80 at
x = 3) and beyond 5 the output stays at 4.9671.

Implementation. `simulate_braintransformers_silu` runs the neurons step by step
(a loop over time steps, vectorised over every element), in float32 like the
reference in its default precision. `braintransformers_silu` gives the same
numbers in closed form: for each neuron and step, the smallest float32 drive
that makes that step fire under the float32 recurrence (found once by bisection;
the recurrence is monotone in u) is a stair edge; together with the interval
edges these cut the real line into pieces on which the output is constant, and
the value on each piece is taken from the simulation itself. A call is then one
`torch.bucketize` and one table lookup, and matches the step simulation
exactly. Both compute in float32 and return the input's dtype; the output is a
staircase, so it carries no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Neuron:
    threshold: float
    decay: float
    pulses: tuple[float, ...]  # trained pulse amplitude of each step (model_pos.pth / model_neg.pth)

    @property
    def timesteps(self) -> int:
        return len(self.pulses)


# x >= 0: two copies of _FINE plus _COARSE, driven by x.
_FINE = _Neuron(0.3, 0.95, (
    0.056859102, 0.028807705, 0.010055289, 0.0051796855, 0.0032301354,
    0.0024031717, 0.0015972424, 0.0010656371, 0.001061625, 0.009978996,
))
_COARSE = _Neuron(5.0, 1.0, (
    1.3119893, 1.7977078, 0.6698906, 0.36798078, 0.16459712,
    0.12493188, 0.08675715, 0.06301725, 0.04760565, 0.092130564,
))
# x < 0: one neuron per interval, driven by -x.
_NEAR = _Neuron(1.0, 0.995, (
    -0.030369041, -0.07115911, -0.04021282, -0.02462797, -0.016774816,
    -0.011888738, -0.008409286, -0.006580255, -0.0051186397, -0.0042541213,
    -0.00357111, -0.0033904922, -0.0032807216, -0.003320131, -0.003627583,
    -0.0042253146, -0.0042253146, -0.005861757, -0.007968941, -0.007968941,
))
_MID = _Neuron(1.0, 0.99, (-0.014662244,) * 10)
_FAR = _Neuron(1.0, 0.99, (-0.0073357783,) * 5)

# Left edges of the negative intervals: [NEAR_EDGE, 0) -> _NEAR, [MID_EDGE, NEAR_EDGE) -> _MID,
# [FAR_EDGE, MID_EDGE) -> _FAR, below FAR_EDGE -> 0.
NEAR_EDGE, MID_EDGE, FAR_EDGE = -2.0, -4.0, -6.0
SATURATION = 2 * sum(_FINE.pulses) + sum(_COARSE.pulses)  # ~4.9671, the output for every x >= 5


def _fire(neuron: _Neuron, drive: torch.Tensor) -> torch.Tensor:
    """Σ_t p_t·[V_t ≥ θ] for the never-reset leaky membrane, step by step (float32 drive)."""
    threshold = torch.tensor(neuron.threshold, dtype=drive.dtype, device=drive.device)
    membrane = torch.zeros_like(drive)
    out = torch.zeros_like(drive)
    for pulse in neuron.pulses:
        membrane = membrane * neuron.decay + drive
        out = out + (membrane >= threshold).to(drive.dtype) * pulse
    return out


def simulate_braintransformers_silu(x: torch.Tensor) -> torch.Tensor:
    """The reference's SNN SiLU by explicit time stepping of its neurons (float32)."""
    xf = x.float()
    fine = _fire(_FINE, xf)
    positive = (fine + fine) + _fire(_COARSE, xf)
    out = torch.zeros_like(xf)
    out = torch.where((xf >= FAR_EDGE) & (xf < MID_EDGE), _fire(_FAR, -xf), out)
    out = torch.where((xf >= MID_EDGE) & (xf < NEAR_EDGE), _fire(_MID, -xf), out)
    out = torch.where((xf >= NEAR_EDGE) & (xf < 0), _fire(_NEAR, -xf), out)
    out = torch.where(xf >= 0, positive, out)
    return out.to(x.dtype)


def _first_firing_drive(neuron: _Neuron) -> torch.Tensor:
    """For each step t, the smallest float32 drive u ≥ 0 with V_t(u) ≥ θ (float32 recurrence).

    V_t is monotone in u, so bisect over the bit patterns of non-negative floats,
    whose integer order is their numeric order. u = θ always fires (V_t ≥ u).
    """
    steps = neuron.timesteps
    threshold = torch.tensor(neuron.threshold, dtype=torch.float32)
    lo = torch.zeros(steps, dtype=torch.int32)  # 0.0: never fires
    hi = threshold.view(torch.int32).expand(steps).clone()
    while bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2
        drive = mid.view(torch.float32)  # candidate t is tested at step t
        membrane = torch.zeros(steps)
        history = []
        for _ in range(steps):
            membrane = membrane * neuron.decay + drive
            history.append(membrane)
        fires = torch.stack(history).diagonal() >= threshold
        hi = torch.where(fires, mid, hi)
        lo = torch.where(fires, lo, mid)
    return hi.view(torch.float32)


def _staircase() -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted stair edges e_i (float32) and the output on each piece: value[i] on [e_{i-1}, e_i)."""
    edges = {0.0, NEAR_EDGE, MID_EDGE, FAR_EDGE}
    for neuron in (_FINE, _COARSE):  # fires on x ≥ u*
        edges.update(_first_firing_drive(neuron).tolist())
    for neuron in (_NEAR, _MID, _FAR):  # driven by -x: fires on x ≤ -u*, so the piece starts just above
        for u in _first_firing_drive(neuron).tolist():
            edges.add(torch.nextafter(torch.tensor(-u), torch.tensor(math.inf)).item())
    sorted_edges = torch.tensor(sorted(edges), dtype=torch.float32)
    # x = -inf lies left of every edge; each edge is the first point of its piece.
    samples = torch.cat([torch.tensor([-math.inf]), sorted_edges])
    return sorted_edges, simulate_braintransformers_silu(samples)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _TABLES:
        if "cpu" not in {d.type for d in _TABLES}:
            _TABLES[torch.device("cpu")] = _staircase()
        cpu = _TABLES[torch.device("cpu")]
        _TABLES[device] = (cpu[0].to(device), cpu[1].to(device))
    return _TABLES[device]


def braintransformers_silu(x: torch.Tensor) -> torch.Tensor:
    """The reference's SNN SiLU output for every element of x (closed form, float32).

    Equal to `simulate_braintransformers_silu(x)`: a staircase that follows SiLU
    on [-6, 1] within 0.0918, gives 0 below -6 and saturates at 4.9671 from x = 5.
    NaN gives 0, as in the reference (a NaN fails every interval test there).
    """
    xf = x.detach().float()
    edges, values = _tables(xf.device)
    out = values[torch.bucketize(xf, edges, right=True)]
    out = torch.where(torch.isnan(xf), 0.0, out)
    return out.to(x.dtype)


class StaircaseSiLU(nn.Module):
    """Drop-in for the MLP activation in the `braintransformers` baseline.

    simulation: "fast" (default) -> closed-form staircase; "step" -> explicit
    time-stepped neurons (same numbers); "ann" -> torch.nn.functional.silu.
    """

    def __init__(self) -> None:
        super().__init__()
        self.simulation = "fast"

    def extra_repr(self) -> str:
        return f"simulation={self.simulation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simulation == "ann":
            return F.silu(x)
        if self.simulation == "step":
            return simulate_braintransformers_silu(x)
        return braintransformers_silu(x)
