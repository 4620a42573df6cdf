"""Pieces both fine-tuning rules share: the synapses, the teacher's weights, the distillation loss, batches."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.synapsis import Synapsis


def synapses(model: nn.Module) -> list[tuple[str, Synapsis]]:
    """Every (name, Synapsis) of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Synapsis)]


def mean_abs_weight(params: dict[str, torch.Tensor]) -> float:
    """The mean |w| over the weight matrices in `params` (biases left out): the scale of a model's weights."""
    weights = [value for name, value in params.items() if name.endswith("weight")]
    return sum(float(w.abs().sum()) for w in weights) / sum(w.numel() for w in weights)


def synaptic_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights and biases of every Synapsis, by their state-dict name."""
    found = {}
    for name, module in synapses(model):
        for pname, param in module.synapse.named_parameters():
            found[f"{name}.synapse.{pname}"] = param
    return found


@contextlib.contextmanager
def swapped_weights(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor] | None):
    """Temporarily give `params` the tensors in `values` (the teacher's original weights); no-op for None."""
    if not values:
        yield
        return
    saved = {}
    try:
        for name, tensor in values.items():
            saved[name] = params[name].data
            params[name].data = tensor
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) = Σ_v p_t(v)·(log p_t(v) − log p_s(v)), one value per position."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


class Batches:
    """Batch k of an endless, seeded shuffle of the training windows — a function of (seed, k) only.

    Epoch e visits the windows in the order ``randperm(n, seed·1000003 + e)``;
    batch k holds positions k·B … k·B+B−1 of that endless sequence. Nothing has
    to be saved to resume mid-epoch: the step number is enough.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._orders = {epoch: torch.randperm(self.windows.shape[0], generator=generator)}
        return self._orders[epoch]

    def __call__(self, k: int) -> torch.Tensor:
        n = self.windows.shape[0]
        rows = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            rows.append(int(self._order(j // n)[j % n]))
        return self.windows[rows]
