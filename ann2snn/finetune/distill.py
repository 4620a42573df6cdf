"""`distill`: tune the thresholds and the weights (or the thresholds only) so the SNN's next-token distribution meets the ANN's.

Objective, over the positions i of a batch of the user's text and the decoder
layers l = 1…L whose outputs (residual stream; the last one after the final
norm, as transformers' ``hidden_states`` give them) are h_l:

    loss = 1/N Σ_i KL(p_ANN(·|x_<i) ‖ p_SNN(·|x_<i))
           + λ · 1/L Σ_l ‖h_l^SNN − h_l^ANN‖² / ‖h_l^ANN‖²
    KL   = Σ_v p_ANN(v) (log p_ANN(v) − log p_SNN(v))

- teacher p_ANN, h^ANN: the same model in ``"ann"`` simulation (spiking off),
  under ``torch.no_grad``, with the weights it had before fine-tuning (so a run
  that also trains the weights never chases a moving teacher);
- student p_SNN, h^SNN: the model in ``"fast"`` simulation — exactly what the
  spiking network accumulates — made differentiable by
  `ste.differentiable_neurons`: straight-through gradients on every neuron's
  rounding, LSQ gradients on every calibrated neuron's step Δ;
- the second term (``hidden`` = λ, default 1; 0 turns it off) matches every
  layer's output to the ANN's, relative to its size: each layer's thresholds
  get a direct signal besides the one that comes back through the later layers.
  The reported loss is the KL alone.

Trained: every calibrated threshold (Synapsis inputs, SNNSiLU inputs, attention
q/k/v; with ``softmax`` also each layer's SNNSoftmax clip), as
Δ_c = exp(s_c + g): a per-channel log-step s_c (Adam at ``lr``) and one log-scale
g per neuron shared by its channels (Adam at ``scale_lr``, default ``lr``; 0
turns it off). Adam moves every channel's s_c at about the same rate whether its
gradient is signal or noise; g pools the gradient of all the neuron's channels,
so the neuron's overall clip follows the signal. With ``train_weights`` (the
default) also every Synapsis weight and bias, with Adam at ``weight_lr``. Adam
moves a parameter by about its rate whatever the parameter's size, and models'
weights differ in size (mean |w|: qwen2-tiny 0.052, SmolLM2-135M 0.138,
Qwen2.5-Coder-0.5B 0.013), so by default the rate is relative:
``relative_weight_lr`` (7.2e-4) times the model's mean |w|, the 1e-4 SmolLM2 was
tuned at. At 1e-4, ten times its relative rate, Qwen2.5-Coder-0.5B backed off
in every seed and closed 23.5 % of the gap on prose; at its relative rate none
backs off and it closes 53.9 % (T = 4, docs/finetune.md). A threshold's log moves
by a relative amount already. Thresholds alone cannot undo all that the coarse levels of a
small T lose: with the weights, more of the held-out gap closes on text of the
training kind (qwen2-tiny, phase T = 4: 56.5 % against 49.9 %; SmolLM2-135M, one
seed: 59 % against 43 %; docs/finetune.md), so the weights train by default;
``train_weights=False`` keeps the float network as converted (and needs no
copies of the weights, see docs/finetune.md, Memory).
Gradients are clipped to norm 1. Every rate follows ``schedule``: ``"cosine"``
(default) falls from the rate to 0 over the run's ``steps`` (after ``warmup``
linear steps), ``"constant"`` keeps it; a resumed run that asks for more steps
continues on the longer run's curve.

Early stopping: every ``eval_every`` steps (default 25) and at the last one, the
KL on the holdout (text the training never sees, `holdout.py`) is measured, and
the run ends in the state where it was lowest (``eval_every=0``: the last state).
The state before the first step counts as one of them: a run that never beats
it ends where it started.

Rates that are too large for the model back off: when an evaluation finds the
holdout KL above where the run started, the run has diverged, not overfitted
(early stopping handles that): the state goes back to the best so far, Adam's
moments are dropped, and every rate is divided by ``backoff`` (at most
``max_backoffs`` times). Qwen2.5-Coder-0.5B at T = 4 diverged at the rates tuned
on the embedded model and SmolLM2-135M, before the weights' rate followed their
scale (loss 0.10 → 1.09, every seed undone); backing off twice, it closed 89 % of
the gap on code it never saw (docs/finetune.md). It is a safeguard: at today's
rates no seed of that model backs off at T = 4.

Every rate follows the code's level spacing (``rates_follow_levels``, the
default): the rates above are T = 4's, and at a larger T each is multiplied by
L(4) / L(T), L the largest count the code sends (phase: 2^T − 1, so 15/63 at
T = 6 and 15/255 at T = 8; rate: T; never above 1). A finer code leaves a
smaller gap, and the step that closes a T = 4 gap overshoots it: at 3e-2
every run on SmolLM2-135M and Qwen2.5-Coder-0.5B backed off once at T = 6 and
twice at T = 8, to about these factors, with half a cosine schedule left.
Started there, SmolLM2-135M at T = 6 closes 39.0 % / 49.1 % of the gap on new text
over three seeds (45.6 % / 53.1 % at 1/4), where 3e-2 closed 10.7 % / 3.0 % (docs/finetune.md).
The options are `DistillOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..coding import SpikeCode
from ..errors import ConfigError
from ..modules.neuron import set_simulation
from .common import kl_per_token, mean_abs_weight, swapped_weights
from .rule import LearningRule, check_choice, check_number
from .ste import differentiable_neurons


SCHEDULES = ("cosine", "constant")


@dataclass
class DistillOptions:
    schedule: str = "cosine"  # how every rate falls over the run: "cosine" to 0, or "constant"
    softmax: bool = False  # also tune each layer's SNNSoftmax clip
    warmup: int = 0  # linear warm-up steps
    hidden: float = 1.0  # λ, the weight of the per-layer residual-stream term (0: KL only)
    scale_lr: float | None = None  # Adam rate of the per-neuron log-scales g (None: lr; 0: no scales)
    train_weights: bool = True  # also tune the Synapsis weights and biases (False: thresholds only)
    relative_weight_lr: float = 7.2e-4  # their Adam rate, as a share of the model's mean |w| (see above) ...
    weight_lr: float | None = None  # ... unless given here as a rate
    eval_every: int = 25  # steps between holdout evaluations (early stopping; 0: keep the last state)
    backoff: float = 4.0  # what every rate is divided by when an evaluation finds the run diverged
    max_backoffs: int = 2  # how many times (0: never)
    rates_follow_levels: bool = True  # every rate × the code's level spacing relative to T = 4's (at most 1)

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        check_number("hidden", self.hidden)
        check_number("scale_lr", self.scale_lr, allow_none=True)
        check_number("relative_weight_lr", self.relative_weight_lr)
        check_number("weight_lr", self.weight_lr, allow_none=True)
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)) or not self.backoff > 1:
            raise ConfigError(f"backoff must be a number above 1, got {self.backoff!r}")
        for name in ("warmup", "eval_every", "max_backoffs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer of at least 0, got {value!r}")
        if not all(isinstance(getattr(self, name), bool) for name in ("softmax", "train_weights", "rates_follow_levels")):
            raise ConfigError("softmax, train_weights and rates_follow_levels must be true or false")


REFERENCE_TIMESTEPS = 4  # the T the default rates were tuned at


def level_spacing_factor(model) -> float:
    """L(4) / L(T) for the model's code and T (at most 1): how much finer its levels are than T = 4's."""
    recipe = (getattr(model, "ann2snn", None) or {}).get("recipe") or {}
    if "coding" not in recipe or "timesteps" not in recipe:
        return 1.0
    code, reference = (SpikeCode(recipe["coding"], t) for t in (recipe["timesteps"], REFERENCE_TIMESTEPS))
    return min(1.0, reference.max_count / code.max_count)


class Distill(LearningRule):
    name = "distill"
    Options = DistillOptions
    default_lr = 3e-2
    grad_clip = 1.0

    @staticmethod
    def changes_weights(options: DistillOptions) -> bool:
        return options.train_weights

    def __init__(self, model, options: DistillOptions, **common):
        super().__init__(model, options, **common)
        self.rate_factor = level_spacing_factor(model) if options.rates_follow_levels else 1.0
        self.lr *= self.rate_factor
        self.scale_lr = self.lr if options.scale_lr is None else options.scale_lr * self.rate_factor
        self.weight_lr = None
        if options.train_weights:
            self.weight_lr = options.weight_lr
            if self.weight_lr is None:  # the converted weights' scale: the same on a resumed run
                self.weight_lr = options.relative_weight_lr * mean_abs_weight(self.originals)
            self.weight_lr *= self.rate_factor
        self.best: tuple[float, dict] | None = None  # (holdout KL, trained state) of the best evaluation so far
        self.start_kl: float | None = None  # the holdout KL before the first step
        self.backoffs = 0

    def rate(self, k: int) -> float:
        """The factor on the rates at step k (0-based)."""
        warmup = self.options.warmup
        factor = min(1.0, (k + 1) / warmup) if warmup else 1.0
        if self.options.schedule == "cosine" and self.steps:
            factor *= 0.5 * (1 + math.cos(math.pi * min(k, self.steps) / self.steps))
        return factor

    def __enter__(self):
        self._context = differentiable_neurons(self.model, train_steps=True, softmax=self.options.softmax,
                                               scales=bool(self.scale_lr))
        self.neurons = self._context.__enter__()
        groups = [{"params": self.neurons.parameters(), "lr": self.lr}]
        if self.scale_lr:
            groups.append({"params": self.neurons.scale_parameters(), "lr": self.scale_lr})
        if self.options.train_weights:
            for param in self.synaptic.values():
                param.requires_grad_(True)
            groups.append({"params": list(self.synaptic.values()), "lr": self.weight_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.base_rates = [group["lr"] for group in groups]
        self.trained = [p for group in groups for p in group["params"]]
        return self

    def __exit__(self, *exc):
        for param in self.synaptic.values():
            param.requires_grad_(False)
        return self._context.__exit__(*exc)

    def _forward(self, ids):
        hidden = bool(self.options.hidden)
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, (out.hidden_states[1:] if hidden else ())

    def step(self, ids: torch.Tensor, k: int, last: bool = False) -> float:
        every = self.options.eval_every
        if every and self.best is None:  # the state the run starts from is the first candidate
            self.start_kl = self.holdout.evaluate().kl
            self.best = (self.start_kl, self._trained_state())
        with torch.no_grad(), swapped_weights(self.synaptic, self.originals):
            set_simulation(self.model, "ann")
            teacher, teacher_hidden = self._forward(ids)
        set_simulation(self.model, "fast")
        student, student_hidden = self._forward(ids)
        kl = kl_per_token(teacher, student).mean()
        loss = kl
        if self.options.hidden:
            terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-30)
                     for s, t in zip(student_hidden, teacher_hidden)]
            loss = loss + self.options.hidden * torch.stack(terms).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
        for group, base in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = base * self.rate(k)
        self.optimizer.step()
        if every and ((k + 1) % every == 0 or last):
            self._early_stopping(last)
        return kl.item()

    def _early_stopping(self, last: bool) -> None:
        """Remember the state with the lowest holdout KL; back off when the KL rose above the start's; at the end
        of the run, go back to the best state."""
        kl = self.holdout.evaluate().kl
        if kl < self.best[0]:
            self.best = (kl, self._trained_state())
        elif kl > self.start_kl and not last and self.backoffs < self.options.max_backoffs:
            self._load_trained_state(self.best[1])
            self.optimizer.state.clear()
            self.base_rates = [rate / self.options.backoff for rate in self.base_rates]
            self.backoffs += 1
        if last:
            self._load_trained_state(self.best[1])

    def _trained_state(self) -> dict:
        state = {"log_deltas": {name: p.detach().cpu().clone() for name, p in self.neurons.log_deltas.items()},
                 "log_scales": {name: p.detach().cpu().clone() for name, p in self.neurons.log_scales.items()}}
        if self.options.train_weights:
            state["weights"] = {name: p.detach().cpu().clone() for name, p in self.synaptic.items()}
        return state

    def _load_trained_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["log_deltas"].items():
                self.neurons.log_deltas[name].copy_(value)
            for name, value in state["log_scales"].items():
                self.neurons.log_scales[name].copy_(value)
            for name, value in state.get("weights", {}).items():
                self.synaptic[name].copy_(value)

    # checkpoint state: the log-thresholds, the trained weights, Adam's moments and the best state so far
    def state_dict(self) -> dict:
        return {**self._trained_state(), "optimizer": self.optimizer.state_dict(), "best": self.best,
                "start_kl": self.start_kl, "base_rates": self.base_rates, "backoffs": self.backoffs}

    def load_state_dict(self, state: dict) -> None:
        self._load_trained_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.best, self.start_kl = state["best"], state["start_kl"]
        self.base_rates, self.backoffs = state["base_rates"], state["backoffs"]

    def summary(self) -> dict:
        return {"weight_lr": self.weight_lr, "rate_factor": self.rate_factor,
                "best_holdout_kl": self.best[0] if self.best else None, "start_holdout_kl": self.start_kl,
                "rate_backoffs": self.backoffs, "final_rates": self.base_rates}
