"""`stdp`: reward-modulated spike-timing-dependent plasticity on the Synapsis weights, with homeostatic thresholds.

After BrainTransformers (arXiv 2410.14687), whose third training stage adapts the
synapses with STDP gated by a global reward signal; here the rule is written for
ann2snn's neurons and schedule, and taught by the ANN (a supervised STDP in the
manner of ReSuMe, Ponulak & Kasiński 2010: the post-synaptic spikes that drive
plasticity are the *desired minus the actual* ones).

Spike times. A Synapsis' input neuron integrates a token's whole input, then
fires its T steps; the next stage integrates that window and fires in the next
T steps (see `ann2snn.modules.neuron`). With tokens streamed one window after
another, token p's pre-synaptic spike at step t happens at time pT + t and the
post-synaptic spike it causes, at step t', at (p+1)T + t'. So

- pairs within a token are causal: Δt = t_post − t_pre = T + t' − t ∈ [1, 2T−1];
- token p's post-synaptic window overlaps token p+1's pre-synaptic window:
  Δt = t' − t, of either sign.

Pairs further apart (≥ one whole window more) are left out.

Spike trains (from the step simulation, ``SpikeTrain``):

- pre-synaptic, synapse (j, i): the Synapsis input train, s_{p,t,i} ∈ {−1, 0, 1},
  each spike worth its threshold: x_{p,t,i} = s_{p,t,i}·w_t·Δ_i (w_t = 1 for
  rate, 2^(T−1−t) for phase coding), so Σ_t x_{p,t,i} = x̂_{p,i}, the value the
  neuron sends;
- post-synaptic, output j: a signed neuron with the same code reading the
  teaching current e_{p,j} = y*_{p,j} − y_{p,j}, y the layer's output in the
  SNN and y* the desired output. Its step is Δ^e_j = max_p |e_{p,j}| / L for
  the batch and its train ε_{p,t',j}·w_{t'}·Δ^e_j sums to e_{p,j} (rounded).
  Encoding the difference is encoding "desired − actual" post-synaptic spikes
  at the resolution of the error rather than of the output.

The desired output (``teacher``):

- ``"local"`` (default): y* = W₀·x_p + b, the converted weights applied to the
  float current x_p that this Synapsis' input neurons received. The error is
  then what this layer's own rounding (and its drift from W₀) costs, and each
  synapse learns only that, from what it sees.
- ``"network"``: y* is the layer's output in the ANN (float all the way). The
  layer then also chases every error upstream of it, which depends on the
  text: on qwen2-tiny (phase, T = 3, 200 steps, seeds 0/1/2, KL-only
  safeguard) it closed 9.0 / 19.3 / 11.3 % of the held-out gap (same author as
  the training text) but widened another author's by 10.2 / 10.7 / 8.4 %, where
  ``"local"`` closed 9.2 / 8.3 / 8.6 % and moved the other author's by −0.0 /
  +0.6 / −8.1 %. (On that model and T a random weight perturbation of
  10⁻⁴·mean|W| alone moves the other author's gap by −6.9 … −2.0 %: each level
  that flips shows.) docs/finetune.md has the figures.

STDP window, per pair at Δt = t_post − t_pre (time in steps):

    δ(Δt) = A₊·exp(−Δt/τ₊)   for Δt > 0  (pre before post: potentiation)
    δ(Δt) = −A₋·exp(Δt/τ₋)   for Δt < 0  (post before pre: depression)
    δ(0)  = 0

with τ₊ = τ₋ = T by default, A₊ = 1 and A₋ = 0 by default. Within a token every
pair is causal, so the depression branch only ever pairs token p's post-synaptic
spikes with token p+1's pre-synaptic spikes, which they cannot have caused; on
qwen2-tiny (phase coding, T = 3, 200 steps) any depression there (A₋ = 0.25 or
1) fitted the training text's token-to-token statistics and made a different
author's text worse (its perplexity gap grew 8 % and 11 %), while with A₋ = 0
the rule closed 17–21 % of the same-author held-out gap and left the other
author's within ±7 % (measured with the ``"network"`` teacher). Pass
``a_minus`` to turn depression on.

Per-synapse eligibility trace, for weight W_ji, summed over the batch's tokens:

    E_ji = Σ_p Σ_{t,t'} ε_{p,t',j}·w_{t'}Δ^e_j · [ δ(T + t' − t)·x_{p,t,i} + δ(t' − t)·x_{p+1,t,i} ]

Counting a token's own pairs only, with a flat window (δ ≡ 1), E = Σ_p e_p x̂_pᵀ:
the local delta rule that makes the layer reproduce its ANN output from its
quantised input (tested). The exponential window weighs pairs by their distance
in time, and the next-token pairs add what a streamed network would also see.
E is normalised per pre-synaptic neuron (``normalise="synapse"``, the default):

    Ê_ji = E_ji / (N·mean δ_own·d·P_i),   P_i = mean_p x̂_pi²

(N tokens, mean δ_own the mean window weight of the causal pairs, d the
layer's fan-in, P_i the power of pre-synaptic neuron i over the batch), an LMS
step preconditioned by each input's own power, which every synapse can keep
track of. When all inputs have the same power this is normalised LMS,
Ê = E / (N·mean δ_own·mean_p‖x̂_p‖²) (``normalise="layer"``, the rule before
issue 19's third round), and η = 1 would remove one token's whole teaching
current if the batch held that token alone; averaged over many, differing
tokens the step is far smaller. Why per neuron: averaged over a batch, the
update contracts the error along each eigenvector k of the inputs'
correlation by 1 − η·λ_k/(normaliser), so it is stable only while η·λ_max
stays below twice the normaliser. Measured on the Synapsis inputs (phase,
T = 4, 4×128 tokens of train.txt), λ_max is at most 36 % of the trace (the
layer's mean‖x‖²) on qwen2-tiny, but on SmolLM2-135M, whose residual stream
carries a few huge channels, up to 85 % for q/k/v, 69 % for gate/up and 99.9 %
for down_proj: with the layer's normaliser the steps that suited qwen2-tiny
overshoot along that one direction, and the held-out KL rose from the third
update on. Divided by each input's power (the correlation matrix, unit
diagonal), λ_max is at most 19 % of d on qwen2-tiny and 35 % on SmolLM2: one η
suits both (tested on a made-up layer with one huge input, where the layer's
normaliser diverges and the neuron's converges).

Global modulation. With L_b the batch's task loss (KL of the SNN from the ANN,
as `distill`) and L̄ its moving average (L̄ ← (1−α)L̄ + αL_b, started at the
first loss),

    G_b = σ(β·(L̄ − L_b)/L̄)        ∈ (0, 1)

(the difference is taken relative to L̄ so β has no units): a batch the SNN
handles better than usual strengthens plasticity, a worse one weakens it.

Weight update. The eligibility traces integrate the gated Ê of ``accumulate``
batches (default 8; one batch's tokens are too few to estimate a trace per
synapse), then, per synapse,

    W ← W + η·( Σ_b G_b·Ê_b / Σ_b G_b − λ·(W − W₀) )

and the traces restart from zero: the gate weighs the batches against each
other, η alone sets how far an update goes (before issue 19's third round the
sum was divided by n, so an update's step was η times the mean gate, which a
run's first batches, measured against a baseline of one batch, pulled down to
0.1–0.3 on SmolLM2 and later ones up to 0.6). The "−w" term of the published
rule becomes a pull towards the converted weights W₀ (λ = ``anchor``, default
0): a decay towards zero would erase the pretrained network. The default η = 4
is the step that suited qwen2-tiny before (η = 8 times its mean gate of 0.5:
with traces over 8+ batches, η·G between 2 and 4 lowered the held-out KL most,
below 1 the change drowned in the rounding noise of the quantised network, and
at phase T = 4 η·G = 16 diverged).

Homeostatic thresholds. At the same update, each calibrated neuron's firing
rate r_c (mean over tokens and steps of |s|, averaged over the batches) is
pulled towards a target rate r*_c, slowly:

    log Δ_c ← log Δ_c + η_θ·(r_c − r*_c)

(firing too often raises the threshold). The default target is the rate the
same neuron has when driven by the ANN's activations (``target_rate=None``),
a per-channel set point; a number sets one target rate for every neuron.

Error-driven thresholds. The teaching current also steers the threshold Δ_c of
each Synapsis input neuron — a three-factor rule: the post-synaptic teaching
current fed back through the synapse's own weights, b_p = Wᵀe_p (what the
layer's error asks of input c), times the neuron's own quantisation residual
∂x̂_c/∂Δ_c (LSQ: k − u inside the clip, ±L outside; u = x/Δ, k the spike count),
times the gate. Per token a_p = G·b_{p,c}·(∂x̂_c/∂Δ_c)·Δ_c is minus the gradient of
the layer's own error ½‖e_p‖² in log Δ_c; over the N tokens of the update

    log Δ_c ← log Δ_c + η_c·Σ_p a_p / √(N·Σ_p a_p²)

The factor is mean(a)/rms(a) ∈ [−1, 1]: near ±1 when the tokens agree on the
direction, about 1/√N when they do not, so a threshold moves (at most by η_c,
``clip_rate``, default 20 %) only as far as the text consistently asks — a
decorrelated, bounded step rather than one that follows the noise of one text.

Early stopping on held-out text. Every update is applied as it comes — the
trajectory is not steered update by update — and after each one the selection
half of the holdout (text the training never sees, see `holdout.py`) is
measured; the run ends in the state where the KL there was lowest (the
converted SNN, if no update lowered it), as `distill` does. The whole run is
then kept only if the other half of the holdout, which chose nothing, confirms
the gain beyond its noise (`finetune`). So the updates are steered towards what
helps on text unlike the batches they were learnt from, and no update that only
fitted the training text survives.

Why not a test per update: one update's effect on the holdout is of the order of
its noise (on qwen2-tiny at phase T = 3 and 2048 tokens: KL falls of
0.001–0.004 against a paired noise of ±0.006 — any change flips levels), so
keeping an update only if the KL fell (the rule before issue 19's second round,
with backtracking to η/2, η/4) rejected most of a trajectory whose sum helps: on
qwen2-tiny at phase T = 4 (seed 0, 12 updates) all 12 updates applied closed
28 % / 13 % of the gap on held-out text of the training kind / another kind,
while the per-update test kept 2 of 12, which the deciding half did not confirm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..coding import SpikeCode
from ..errors import ConfigError
from ..modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from .common import kl_per_token, logits, swapped_weights, synapses
from .holdout import HoldoutFigures
from .rule import LearningRule, check_choice, check_number
from .ste import calibrated_neurons


TEACHERS = ("local", "network")  # where the post-synaptic "desired" output comes from (module docstring)
NORMALISATIONS = ("synapse", "layer")  # what a trace is divided by (module docstring)


def stdp_window(code: SpikeCode, a_plus: float, a_minus: float, tau_plus: float, tau_minus: float):
    """(δ_own [T,T], δ_next [T,T]): window weights δ(Δt) indexed [t_post, t_pre] for own- and next-token pairs."""
    T = code.timesteps
    t_post = torch.arange(T, dtype=torch.float32).reshape(-1, 1)
    t_pre = torch.arange(T, dtype=torch.float32).reshape(1, -1)

    def delta(dt):
        return torch.where(dt > 0, a_plus * torch.exp(-dt / tau_plus),
                           torch.where(dt < 0, -a_minus * torch.exp(dt / tau_minus), torch.zeros_like(dt)))

    return delta(T + t_post - t_pre), delta(t_post - t_pre)


def _rate(train: SpikeTrain, channel_shape: torch.Size) -> torch.Tensor:
    """Per-channel firing rate: mean |s| over steps and tokens."""
    spikes = train.spikes.abs().float()
    if len(channel_shape) == 0:
        return spikes.mean()
    return spikes.reshape((-1,) + tuple(channel_shape)).mean(0)


def _per_channel_sum(values: torch.Tensor, channel_shape: torch.Size) -> torch.Tensor:
    if len(channel_shape) == 0:
        return values.sum()
    return values.reshape((-1,) + tuple(channel_shape)).sum(0)


def clip_eligibility(x: torch.Tensor, train: SpikeTrain, back: torch.Tensor, code: SpikeCode) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_p a_p, Σ_p a_p²) per input channel, a_p = b_p·∂x̂_p/∂Δ·Δ (module docstring, "Error-driven thresholds")."""
    delta = train.delta.float()
    u = x.float() / delta
    k = train.counts().float()
    slope = torch.where(u.abs() <= code.max_count, k - u, k)  # ∂x̂/∂Δ (LSQ)
    a = back.float() * slope * delta
    return _per_channel_sum(a, delta.shape), _per_channel_sum(a * a, delta.shape)


@dataclass
class StdpOptions:
    a_plus: float = 1.0  # A₊, potentiation (pre before post)
    a_minus: float = 0.0  # A₋, depression (post before pre)
    tau_plus: float | None = None  # τ₊ in time steps (None: T)
    tau_minus: float | None = None  # τ₋ in time steps (None: T)
    beta: float = 5.0  # β, the gate's steepness
    baseline_decay: float = 0.1  # α, the loss baseline's moving-average rate
    anchor: float = 0.0  # λ, the pull towards the converted weights W₀
    threshold_rate: float = 0.01  # η_θ, homeostatic threshold rate (0: no homeostasis)
    clip_rate: float = 0.2  # η_c, error-driven threshold rate of the Synapsis input neurons (0: off)
    target_rate: float | None = None  # one target firing rate for every neuron (None: each channel's ANN-driven rate)
    accumulate: int = 8  # batches whose traces make one update
    teacher: str = "local"  # where the desired post-synaptic output comes from (module docstring)
    normalise: str = "synapse"  # divide each trace by its pre-synaptic neuron's power, or ("layer") by the layer's
    train_weights: bool = True  # False: the thresholds only (homeostatic and error-driven), the weights as converted

    def __post_init__(self):
        for name in ("a_plus", "a_minus", "beta", "baseline_decay", "anchor", "threshold_rate", "clip_rate"):
            check_number(name, getattr(self, name))
        for name in ("tau_plus", "tau_minus", "target_rate"):
            check_number(name, getattr(self, name), allow_none=True)
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ConfigError(f"accumulate must be a positive integer, got {self.accumulate!r}")
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("normalise", self.normalise, NORMALISATIONS)
        if not isinstance(self.train_weights, bool):
            raise ConfigError("train_weights must be true or false")


class Stdp(LearningRule):
    name = "stdp"
    Options = StdpOptions
    default_lr = 4.0

    @staticmethod
    def changes_weights(options: StdpOptions) -> bool:
        return options.train_weights

    def __init__(self, model, options: StdpOptions, **common):
        super().__init__(model, options, **common)
        self.trace: dict[str, torch.Tensor] = {}
        self.rates: dict[str, torch.Tensor] = {}
        self.targets: dict[str, torch.Tensor] = {}
        self.clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Σa, Σa² per Synapsis input neuron
        self.tokens = 0  # tokens in the pending batches
        self.pending = 0
        self.gate_sum = 0.0  # Σ G_b over the pending batches
        self.synapses = synapses(model)
        self.neurons = calibrated_neurons(model)
        self.baseline: float | None = None
        self.best: HoldoutFigures | None = None  # the selection half's figures of the best state so far ...
        self.best_state: dict | None = None  # ... that state (weights and thresholds) ...
        self.best_update = 0  # ... and the number of updates it holds
        self.updates = 0
        self.gates: list[float] = []
        self._windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        if self.best is None:
            self.best, self.best_state = self.holdout.evaluate(), self._state()
        return self

    def __exit__(self, *exc):
        set_simulation(self.model, "fast")
        return False

    def _window(self, code: SpikeCode, device) -> tuple[torch.Tensor, torch.Tensor]:
        T = code.timesteps
        if T not in self._windows:
            own, nxt = stdp_window(code, self.options.a_plus, self.options.a_minus, self.options.tau_plus or T, self.options.tau_minus or T)
            self._windows[T] = (own.to(device), nxt.to(device))
        return self._windows[T]

    def eligibility(self, pre: SpikeTrain, error: torch.Tensor, code: SpikeCode) -> torch.Tensor:
        """Normalised per-synapse eligibility Ê [out, in] of one Synapsis for a batch (module docstring)."""
        own, nxt = self._window(code, error.device)
        x = pre.values().float()  # [T, B, S, in]: x_{p,t,i} = s·w_t·Δ_i
        x_next = torch.zeros_like(x)
        x_next[:, :, :-1] = x[:, :, 1:]  # token p+1's pre-synaptic window, within each sequence
        error = error.float()
        err_step = (error.abs().reshape(-1, error.shape[-1]).amax(0) / code.max_count).clamp_min(1e-30)
        teaching = SignedNeuron(code, error.shape[-1], err_step).to(error.device)
        post = teaching.fire(error, err_step).values().float()  # [T, B, S, out]
        filtered = torch.einsum("ab,bnsi->ansi", own, x) + torch.einsum("ab,bnsi->ansi", nxt, x_next)
        trace = post.reshape(-1, post.shape[-1]).t() @ filtered.reshape(-1, filtered.shape[-1])
        tokens = error.numel() // error.shape[-1]
        if self.options.normalise == "layer":  # mean_p ‖x̂_p‖², one figure for the layer
            power = x.sum(0).pow(2).sum(-1).mean().clamp_min(1e-30)
        else:  # d·mean_p x̂_pi², one figure per pre-synaptic neuron i
            power = x.shape[-1] * x.sum(0).pow(2).reshape(-1, x.shape[-1]).mean(0).clamp_min(1e-30)
        return trace / (tokens * own.mean() * power)

    def collect(self, ids: torch.Tensor):
        """One batch through teacher and SNN: (task loss, Ê per Synapsis, SNN rates, target rates)."""
        model = self.model
        targets, target_rates, pre, traces, rates, backs = {}, {}, {}, {}, {}, {}
        readers: dict[int, list[str]] = {}  # input neuron → the Synapsis reading its train (q/k/v share one)
        for name, s in self.synapses:
            readers.setdefault(id(s.neuron), []).append(name)
        handles = []
        try:
            # 1. the teacher: every neuron's rate on the ANN's activations (teacher "network": every Synapsis' output y*)
            for name, syn in self.synapses if self.options.teacher == "network" else ():
                handles.append(syn.register_forward_hook(lambda m, a, out, name=name: targets.__setitem__(name, out.detach())))
            for name, neuron in self.neurons:
                def teacher_rate(m, args, out, name=name):
                    x = args[0].detach()
                    target_rates[name] = _rate(m.fire(x, m.current_delta(x)), m.delta.shape)
                handles.append(neuron.register_forward_hook(teacher_rate))
            with torch.no_grad(), swapped_weights(self.synaptic, self.originals):
                set_simulation(model, "ann")
                teacher = logits(model, ids)
            for h in handles:
                h.remove()
            handles = []

            # 2. the SNN, step by step: pre-synaptic trains, outputs, eligibility traces, rates
            def student_rate(m, args, out):
                name = neuron_name[id(m)]
                rates[name] = _rate(out, m.delta.shape)
                for reader in readers.get(id(m), ()):
                    pre[reader] = out

            def trace(m, args, out, name):
                if self.options.teacher == "local":  # y* = W₀·x + b: the converted weights on this layer's own float input
                    converted = self.originals[f"{name}.synapse.weight"] if self.originals else m.synapse.weight
                    target = F.linear(args[0].detach(), converted, m.synapse.bias)
                else:
                    target = targets.pop(name)
                train, error = pre.pop(name), target - out.detach()
                if self.options.train_weights:
                    traces[name] = self.eligibility(train, error, m.neuron.code)
                if self.options.clip_rate and id(m.neuron) in neuron_name:
                    back = error.float() @ m.synapse.weight.float()  # the teaching current, fed back through W
                    # a shared input neuron (q/k/v, gate/up) is taught by the sum of what its readers feed back
                    key = neuron_name[id(m.neuron)]
                    if key in backs:
                        back = back + backs[key][2]
                    backs[key] = (args[0].detach(), train, back, m.neuron.code)

            neuron_name = {id(n): name for name, n in self.neurons}
            for name, neuron in self.neurons:
                handles.append(neuron.register_forward_hook(student_rate))
            for name, syn in self.synapses:
                handles.append(syn.register_forward_hook(lambda m, a, out, name=name: trace(m, a, out, name)))
            with torch.no_grad():
                set_simulation(model, "step")
                loss = kl_per_token(teacher, logits(model, ids)).mean().item()
        finally:
            for h in handles:
                h.remove()
            set_simulation(model, "fast")

        clips = {name: clip_eligibility(x, train, back, code) for name, (x, train, back, code) in backs.items()}
        return loss, traces, rates, target_rates, clips

    def step(self, ids: torch.Tensor, k: int, last: bool = False) -> float:
        loss, traces, rates, target_rates, clips = self.collect(ids)

        # 3. global modulation from the loss against its moving baseline
        if self.baseline is None:
            self.baseline = loss
        gate = 1.0 / (1.0 + math.exp(-self.options.beta * (self.baseline - loss) / max(self.baseline, 1e-12)))
        self.baseline = (1 - self.options.baseline_decay) * self.baseline + self.options.baseline_decay * loss
        self.gates.append(gate)

        # 4. the per-synapse eligibility traces integrate the gated Ê of `accumulate` batches
        for name, value in traces.items():
            self.trace[name] = gate * value if name not in self.trace else self.trace[name] + gate * value
        for name, (first, second) in clips.items():
            old = self.clips.get(name, (0.0, 0.0))
            self.clips[name] = (old[0] + gate * first, old[1] + gate * gate * second)
        self.tokens += ids.numel()
        self.gate_sum += gate
        for name, value in rates.items():
            self.rates[name] = value if name not in self.rates else self.rates[name] + value
            self.targets[name] = target_rates[name] if name not in self.targets else self.targets[name] + target_rates[name]
        self.pending += 1
        if self.pending >= self.options.accumulate or last:
            self._apply()
        if last:
            self._load_state(self.best_state)
        return loss

    def _apply(self) -> None:
        """Plasticity from the integrated traces, then early stopping's measurement; the traces start again from zero."""
        n = self.pending
        changes, factors = {}, {}
        with torch.no_grad():
            for name, syn in self.synapses if self.options.train_weights else ():
                change = self.trace[name] / max(self.gate_sum, 1e-12)  # the gate-weighted mean of the batches' Ê
                if self.options.anchor:
                    weight = syn.synapse.weight.float()
                    change = change - self.options.anchor * (weight - self.originals[f"{name}.synapse.weight"].float())
                changes[name] = change
            if self.options.threshold_rate:
                for name, neuron in self.neurons:
                    if name in self.rates:
                        rate = self.rates[name] / n
                        target = self.targets[name] / n if self.options.target_rate is None else torch.full_like(rate, self.options.target_rate)
                        factors[name] = self.options.threshold_rate * (rate - target)  # Δ log Δ at full rate
            for name, (first, second) in self.clips.items():
                agreement = first / (second * self.tokens).sqrt().clamp_min(1e-30)  # mean(a)/rms(a), in [−1, 1]
                factors[name] = factors.get(name, 0.0) + self.options.clip_rate * agreement
        self.trace, self.rates, self.targets, self.clips, self.pending, self.tokens, self.gate_sum = {}, {}, {}, {}, 0, 0, 0.0

        # 5. apply it; early stopping: remember the state with the lowest KL on the holdout's selection half
        with torch.no_grad():
            for name, syn in self.synapses if self.options.train_weights else ():
                syn.synapse.weight.add_((self.lr * changes[name]).to(syn.synapse.weight.dtype))
            neurons = dict(self.neurons)
            for name, factor in factors.items():
                neurons[name].delta.mul_(torch.exp(factor).to(neurons[name].delta))
        self.updates += 1
        held = self.holdout.evaluate()
        if held.kl < self.best.kl:
            self.best, self.best_update, self.best_state = held, self.updates, self._state()

    def _state(self) -> dict:
        """The weights and thresholds the rule changes, on the CPU."""
        return {"weights": {name: s.synapse.weight.detach().cpu().clone() for name, s in self.synapses
                            if self.options.train_weights},
                "deltas": {name: n.delta.detach().cpu().clone() for name, n in self.neurons}}

    def _load_state(self, state: dict) -> None:
        with torch.no_grad():
            synapses, neurons = dict(self.synapses), dict(self.neurons)
            for name, value in state["weights"].items():
                synapses[name].synapse.weight.copy_(value)
            for name, value in state["deltas"].items():
                neurons[name].delta.copy_(value)

    def state_dict(self) -> dict:
        def cpu(d):
            return {name: value.detach().cpu().clone() for name, value in d.items()}
        return {
            **self._state(),
            "trace": cpu(self.trace), "rates": cpu(self.rates), "targets": cpu(self.targets), "pending": self.pending,
            "clips": {name: [v.detach().cpu().clone() for v in pair] for name, pair in self.clips.items()},
            "tokens": self.tokens, "gate_sum": self.gate_sum,
            "baseline": self.baseline, "best": vars(self.best), "best_state": self.best_state,
            "best_update": self.best_update, "updates": self.updates, "gates": list(self.gates),
        }

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self._load_state(state)
        self.trace = {name: value.to(device) for name, value in state["trace"].items()}
        self.rates = {name: value.to(device) for name, value in state["rates"].items()}
        self.targets = {name: value.to(device) for name, value in state["targets"].items()}
        self.pending = state["pending"]
        self.clips = {name: tuple(v.to(device) for v in pair) for name, pair in state["clips"].items()}
        self.tokens, self.gate_sum = state["tokens"], state["gate_sum"]
        self.baseline, self.best, self.best_state = state["baseline"], HoldoutFigures(**state["best"]), state["best_state"]
        self.best_update, self.updates, self.gates = state["best_update"], state["updates"], list(state["gates"])

    def summary(self) -> dict:
        # kept: the updates up to the state early stopping ended in; undone: those after it
        return {"updates_kept": self.best_update, "updates_undone": self.updates - self.best_update,
                "mean_gate": sum(self.gates) / len(self.gates) if self.gates else None}
