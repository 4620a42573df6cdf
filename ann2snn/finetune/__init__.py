"""Plasticity fine-tuning of a converted SNN: close the gap to its ANN at small T.

    import ann2snn
    from ann2snn.finetune import finetune

    snn = ann2snn.load("out/qwen2-tiny-snn")
    tokenizer = ann2snn.load_tokenizer("out/qwen2-tiny-snn")
    figures = finetune(snn, tokenizer, [open("text.txt").read()], rule="distill", steps=200)
    ann2snn.save(snn, "out/qwen2-tiny-snn-ft", tokenizer)

Two rules:
- ``distill`` (`distill.py`): gradient descent on KL(ANN ‖ SNN) through a
  straight-through estimator of the neurons' rounding, with learnable
  thresholds (LSQ) and optionally weights (`ste.py` makes the neurons
  differentiable without changing them);
- ``stdp`` (`stdp.py`): reward-modulated, ANN-taught spike-timing-dependent
  plasticity on the Synapsis weights, per-synapse eligibility traces from the
  step simulation's spike trains, homeostatic thresholds, and a held-out
  safeguard.

`core.finetune` runs either with held-out figures, checkpoints and resume.
"""

from .core import RULES, finetune, gap_reduction

__all__ = ["finetune", "gap_reduction", "RULES"]
