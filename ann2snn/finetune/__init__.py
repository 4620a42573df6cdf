"""Plasticity fine-tuning of a converted SNN: close the gap to its ANN at small T, on text it never saw.

    import ann2snn
    from ann2snn.finetune import finetune

    snn = ann2snn.load("out/qwen2-tiny-snn")
    tokenizer = ann2snn.load_tokenizer("out/qwen2-tiny-snn")
    figures = finetune(snn, tokenizer, [open("text.txt").read()], rule="distill", steps=200)
    ann2snn.save(snn, "out/qwen2-tiny-snn-ft", tokenizer)

Two learning rules (`rule.LearningRule`, options as dataclasses):
- ``distill`` (`distill.py`, `DistillOptions`): gradient descent on KL(ANN ‖ SNN)
  through a straight-through estimator of the neurons' rounding, with learnable
  thresholds (LSQ) and, by default, weights (`ste.py` makes the neurons
  differentiable without changing them), early-stopped on the holdout;
- ``stdp`` (`stdp.py`, `StdpOptions`): reward-modulated, ANN-taught
  spike-timing-dependent plasticity on the Synapsis weights, per-synapse
  eligibility traces from the step simulation's spike trains, homeostatic
  thresholds, early-stopped on the holdout.

`core.finetune` runs either; `holdout.py` decides, on text the training never
saw, whether to fine-tune at all and whether to keep the result (and, on a guard
text of another kind, whether the result costs text unlike the user's).
"""

from .core import LEARNING_RULES, RULES, finetune, gap_reduction
from .distill import DistillOptions
from .holdout import HoldoutWarning, MIN_HOLDOUT_TOKENS
from .rule import LearningRule
from .stdp import StdpOptions

__all__ = ["finetune", "gap_reduction", "RULES", "LEARNING_RULES", "LearningRule", "DistillOptions", "StdpOptions",
           "HoldoutWarning", "MIN_HOLDOUT_TOKENS"]
