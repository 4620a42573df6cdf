"""`distill`: tune the thresholds (and optionally the weights) so the SNN's next-token distribution meets the ANN's.

Objective, over the positions i of a batch of the user's text:

    loss = 1/N Σ_i KL(p_ANN(·|x_<i) ‖ p_SNN(·|x_<i))
         = 1/N Σ_i Σ_v p_ANN(v) (log p_ANN(v) − log p_SNN(v))

- teacher p_ANN: the same model in ``"ann"`` simulation (spiking off), under
  ``torch.no_grad``, with the weights it had before fine-tuning (so a run that
  also trains the weights never chases a moving teacher);
- student p_SNN: the model in ``"fast"`` simulation — exactly what the spiking
  network accumulates — made differentiable by `ste.differentiable_neurons`:
  straight-through gradients on every neuron's rounding, LSQ gradients on
  every calibrated neuron's step Δ, trained as s = log Δ.

Trained: every calibrated threshold (Synapsis inputs, SNNSiLU inputs, attention
q/k/v), with Adam at ``lr``; with ``train_weights`` also every Synapsis weight and
bias, with Adam at ``weight_lr`` (default lr/100: a weight moves by a relative
amount, a threshold's log by an absolute one). Gradients are clipped to norm 1.
The learning rate is constant, so a resumed run may also ask for more steps.
"""

from __future__ import annotations

import torch

from ..modules.neuron import set_simulation
from .common import kl_per_token, logits, swapped_weights
from .ste import differentiable_neurons


class DistillRule:
    name = "distill"
    default_lr = 1e-2

    def __init__(self, model, *, lr: float, train_weights: bool, weight_lr: float | None,
                 synaptic: dict, originals: dict | None, grad_clip: float = 1.0):
        self.model = model
        self.lr = lr
        self.train_weights = train_weights
        self.weight_lr = lr / 100 if weight_lr is None else weight_lr
        self.synaptic = synaptic
        self.originals = originals
        self.grad_clip = grad_clip
        self._context = None

    def __enter__(self):
        self._context = differentiable_neurons(self.model, train_steps=True)
        self.neurons = self._context.__enter__()
        groups = [{"params": self.neurons.parameters(), "lr": self.lr}]
        if self.train_weights:
            for param in self.synaptic.values():
                param.requires_grad_(True)
            groups.append({"params": list(self.synaptic.values()), "lr": self.weight_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.trained = [p for group in groups for p in group["params"]]
        return self

    def __exit__(self, *exc):
        for param in self.synaptic.values():
            param.requires_grad_(False)
        return self._context.__exit__(*exc)

    def step(self, ids: torch.Tensor, k: int, last: bool = False) -> float:
        with torch.no_grad(), swapped_weights(self.synaptic, self.originals):
            set_simulation(self.model, "ann")
            teacher = logits(self.model, ids)
        set_simulation(self.model, "fast")
        loss = kl_per_token(teacher, logits(self.model, ids)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
        self.optimizer.step()
        return loss.item()

    # checkpoint state: the log-thresholds, the trained weights and Adam's moments
    def state_dict(self) -> dict:
        state = {"log_steps": {name: p.detach().cpu().clone() for name, p in self.neurons.log_steps.items()},
                 "optimizer": self.optimizer.state_dict()}
        if self.train_weights:
            state["weights"] = {name: p.detach().cpu().clone() for name, p in self.synaptic.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["log_steps"].items():
                self.neurons.log_steps[name].copy_(value)
            for name, value in state.get("weights", {}).items():
                self.synaptic[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])

    def summary(self) -> dict:
        return {"weight_lr": self.weight_lr if self.train_weights else None}
