"""`distill`: tune the thresholds (and optionally the weights) so the SNN's next-token distribution meets the ANN's.

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
so the neuron's overall clip follows the signal. With ``train_weights`` also
every Synapsis weight and bias, with Adam at ``weight_lr`` (default 1e-4: a
weight moves by an absolute amount, a threshold's log by a relative one).
Gradients are clipped to norm 1. Every rate follows ``schedule``: ``"cosine"``
(default) falls from the rate to 0 over the run's ``steps`` (after ``warmup``
linear steps), ``"constant"`` keeps it; a resumed run that asks for more steps
continues on the longer run's curve.
"""

from __future__ import annotations

import math

import torch

from ..modules.neuron import set_simulation
from .common import kl_per_token, swapped_weights
from .ste import differentiable_neurons


SCHEDULES = ("cosine", "constant")


class DistillRule:
    name = "distill"
    default_lr = 3e-2
    default_weight_lr = 1e-4
    options = ("schedule", "softmax", "warmup", "hidden", "scale_lr")

    def __init__(self, model, *, lr: float, train_weights: bool, weight_lr: float | None,
                 synaptic: dict, originals: dict | None, steps: int | None = None, grad_clip: float = 1.0,
                 schedule: str = "cosine", softmax: bool = False, warmup: int = 0, hidden: float = 1.0,
                 scale_lr: float | None = None):
        self.model = model
        self.lr = lr
        self.train_weights = train_weights
        self.weight_lr = self.default_weight_lr if weight_lr is None else weight_lr
        self.synaptic = synaptic
        self.originals = originals
        self.steps = steps
        self.grad_clip = grad_clip
        self.schedule = schedule
        self.softmax = softmax
        self.warmup = warmup
        self.hidden = hidden
        self.scale_lr = lr if scale_lr is None else scale_lr
        self._context = None

    def rate(self, k: int) -> float:
        """The factor on the rates at step k (0-based)."""
        factor = min(1.0, (k + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "cosine" and self.steps:
            factor *= 0.5 * (1 + math.cos(math.pi * min(k, self.steps) / self.steps))
        return factor

    def __enter__(self):
        self._context = differentiable_neurons(self.model, train_steps=True, softmax=self.softmax,
                                               scales=bool(self.scale_lr))
        self.neurons = self._context.__enter__()
        groups = [{"params": self.neurons.parameters(), "lr": self.lr}]
        if self.scale_lr:
            groups.append({"params": self.neurons.scale_parameters(), "lr": self.scale_lr})
        if self.train_weights:
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
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=bool(self.hidden))
        return out.logits, (out.hidden_states[1:] if self.hidden else ())

    def step(self, ids: torch.Tensor, k: int, last: bool = False) -> float:
        with torch.no_grad(), swapped_weights(self.synaptic, self.originals):
            set_simulation(self.model, "ann")
            teacher, teacher_hidden = self._forward(ids)
        set_simulation(self.model, "fast")
        student, student_hidden = self._forward(ids)
        kl = kl_per_token(teacher, student).mean()
        loss = kl
        if self.hidden:
            terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-30)
                     for s, t in zip(student_hidden, teacher_hidden)]
            loss = loss + self.hidden * torch.stack(terms).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
        for group, base in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = base * self.rate(k)
        self.optimizer.step()
        return kl.item()

    # checkpoint state: the log-thresholds, the trained weights and Adam's moments
    def state_dict(self) -> dict:
        state = {"log_deltas": {name: p.detach().cpu().clone() for name, p in self.neurons.log_deltas.items()},
                 "log_scales": {name: p.detach().cpu().clone() for name, p in self.neurons.log_scales.items()},
                 "optimizer": self.optimizer.state_dict()}
        if self.train_weights:
            state["weights"] = {name: p.detach().cpu().clone() for name, p in self.synaptic.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["log_deltas"].items():
                self.neurons.log_deltas[name].copy_(value)
            for name, value in state.get("log_scales", {}).items():
                self.neurons.log_scales[name].copy_(value)
            for name, value in state.get("weights", {}).items():
                self.synaptic[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])

    def summary(self) -> dict:
        return {"weight_lr": self.weight_lr if self.train_weights else None}
