"""What a learning rule is: the interface `finetune` drives, and its options as a dataclass.

A `LearningRule` changes a converted SNN a batch at a time. `finetune` makes
it with the model, the rate, the Synapsis parameters (and their converted
values, the teacher's) and the held-out text, enters it, calls `step` once a
batch, saves and restores it with `state_dict` / `load_state_dict`, and asks
it for a `summary` at the end. Its options are a dataclass, `Options`, built
from keyword arguments or ``--option KEY=VALUE`` by `options_from`, which
refuses names the rule does not take before anything is loaded.

(Not to be confused with a recipe's `ann2snn.recipes.base.Rule`, which says
which module a conversion replaces with what.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError


def check_number(name: str, value, minimum: float = 0.0, allow_none: bool = False) -> None:
    """Refuse an option that is not a finite number ≥ `minimum` (booleans are not numbers here)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a number of at least {minimum:g}, got {value!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class LearningRule:
    """A plasticity rule `finetune` can run (subclasses: `distill.Distill`, `stdp.Stdp`)."""

    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass; its fields are the rule's options
    default_lr: ClassVar[float]

    def __init__(self, model: nn.Module, options, *, lr: float, steps: int, synaptic: dict[str, nn.Parameter],
                 originals: dict[str, torch.Tensor] | None, holdout):
        self.model = model
        self.options = options
        self.lr = lr
        self.steps = steps
        self.synaptic = synaptic  # every Synapsis weight and bias, by state-dict name
        self.originals = originals  # their converted values (the teacher's), when the rule changes weights
        self.holdout = holdout  # `common.Holdout`: text the training never sees

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls.Options))

    @classmethod
    def options_from(cls, given: dict):
        """The rule's `Options` from keyword values; unknown names and invalid values are a `ConfigError`."""
        unknown = sorted(set(given) - set(cls.option_names()))
        if unknown:
            raise ConfigError(f"rule {cls.name!r} takes no option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(cls.option_names())}")
        return cls.Options(**given)  # each Options validates itself in __post_init__

    @staticmethod
    def changes_weights(options) -> bool:
        """Whether the rule moves Synapsis weights (then `finetune` keeps their converted values as `originals`)."""
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, ids: torch.Tensor, k: int, last: bool = False) -> float:
        """Learn from batch `ids` (step k, 0-based); returns the batch's KL(ANN ‖ SNN) per token."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Rule-specific figures for `finetune`'s result."""
        return {}
