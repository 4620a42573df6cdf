"""Baseline: the conversion released with BrainTransformers (arXiv 2410.14687), as its code does it.

Reproduced so that users can compare against it on their own model and text;
it is not a recommended setting. As in the public code:
- each Linear's input is quantised by a neuron whose scale is re-derived on
  every call as max|x| / 127 over the whole tensor (all samples of the batch
  together), rate-coded over T = 127 steps, and so is its output;
- SiLU is the reference's neuron staircase, which saturates near 4.97;
- attention stays float (the reference's default sdpa path never spikes);
- RMSNorm, RoPE, residuals, the embedding, lm_head and gate ⊙ up stay float.
"""

from .base import Recipe, Rule

_LAYER = r"model\.layers\.\d+"

RECIPE = Recipe(
    name="braintransformers",
    description="Baseline: BrainTransformers' released conversion (per-call max/127 scale, T=127, staircase SiLU, float attention)",
    model_types=("qwen2", "llama", "mistral"),
    rules=(
        Rule(_LAYER + r"\.(self_attn|mlp)\.\w+_proj", "Linear", "dynamic_synapsis"),
        Rule(_LAYER + r"\.mlp\.act_fn", "SiLU", "staircase_silu"),
    ),
    coding="rate",
    timesteps=127,
    threshold="max",
    float_operations=(
        "embedding lookup",
        "RMSNorm",
        "RoPE",
        "residual additions",
        "attention: QK^T, softmax and weights·V (float sdpa)",
        "gate ⊙ up product in the MLP",
        "lm_head",
    ),
)
