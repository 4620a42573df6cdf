"""ann2snn's recipe for Qwen2-style decoders (Qwen2, and Llama / Mistral, whose blocks match).

Every Linear of every decoder layer becomes a Synapsis (q/k/v sharing one input
neuron, gate/up another, as they read the same tensor), both attention products
run as SNNMatmul on spike trains with SNNSoftmax between them, the MLP's SiLU
becomes SNNSiLU, and lm_head a Synapsis too (``spiking_head``). Phase coding is
the default: at T=8 it holds 511 levels per neuron where a rate code holds 17.
"""

from .base import LevelDefault, Recipe, Rule

_LAYER = r"model\.layers\.\d+"

FLOAT_OPERATIONS = (
    "embedding lookup",
    "RMSNorm (input_layernorm, post_attention_layernorm, final norm)",
    "RoPE rotation of q and k",
    "residual additions",
    "exponential inside SNNSoftmax and the division by its row sum (the sum itself is a spike count)",
    "attention scaling 1/sqrt(head_dim)",
    "SNNSiLU's output table (SiLU read at the input neuron's level)",
    "gate ⊙ up product in the MLP",
    "lm_head",  # unless spiking_head (Recipe.operations_in_float)
)

RECIPE = Recipe(
    name="qwen2",
    description="Spike-driven Qwen2 / Llama / Mistral: Synapsis for every decoder Linear, spiking attention, SNNSiLU",
    model_types=("qwen2", "llama", "mistral"),
    rules=(
        # q/k/v read one RMSNorm output, gate/up another: one input neuron each, its train fanned out.
        Rule(_LAYER + r"\.self_attn\.(q|k|v)_proj", "Linear", "synapsis", shared_input=True),
        Rule(_LAYER + r"\.self_attn\.o_proj", "Linear", "synapsis"),
        Rule(_LAYER + r"\.mlp\.(gate|up)_proj", "Linear", "synapsis", shared_input=True),
        Rule(_LAYER + r"\.mlp\.down_proj", "Linear", "synapsis"),
        Rule(_LAYER + r"\.self_attn", "Attention", "spiking_attention"),
        # SiLU's clip is the calibrated max, so SNNSiLU follows SiLU over the whole calibrated range.
        Rule(_LAYER + r"\.mlp\.act_fn", "SiLU", "snn_silu", threshold="max"),
    ),
    # The head as a Synapsis too, so the largest float matmul goes: on the embedded model its PPL ratio stays
    # within 0.01 % of the float head's from T=6 on; on SmolLM2-135M at T=8, +0.01 % held-out, +0.16 % unseen
    # text (docs/method.md, benchmarks/spiking_head.py).
    head_rules=(Rule(r"lm_head", "Linear", "synapsis"),),
    spiking_head=True,
    # Below T=8 the head's input neuron is what the spiking head costs (SmolLM2-135M at T=6: 1.0252 against a
    # float head's 1.0204), and one more step there removes it: the head gets as many steps beyond T as its own
    # measured effect on the calibration windows asks (calibration/head.py; docs/benchmarks.md, "The spiking
    # head's window").
    head_steps="auto",
    coding="phase",
    timesteps=8,
    # From benchmarks/outliers.py (README): below 511 levels (phase T < 8) the MSE clip search wins;
    # from there on, calibrated maxima with a margin for what calibration did not see.
    level_defaults=(LevelDefault(511, "max", 2.0), LevelDefault(2**14, "max", 4.0)),
    # Range steps where calibration shows heavy tails (docs/qwen25.md): on Qwen2.5-0.5B unseen text drives
    # down_proj's input up to 60× its calibrated max, which no headroom serves without losing resolution.
    range_steps="auto",
    # Per-site levels (calibration/levels.py): each site the fewest steps, at most T, that keep what the PPL ratio may
    # gain on unlike text within 1.01, checked on the calibration text and on the bundled probe text (code, logs,
    # configuration). At T=8 (docs/benchmarks.md, "Per-site levels"): the embedded model's SNN/ANN energy (view i)
    # 0.49 -> 0.39; on SmolLM2-135M and Qwen2.5-0.5B the probe holds the allocation to what keeps code as faithful as
    # uniform levels (an allocation from English prose alone cost SmolLM2 x1.30 in perplexity on Python code).
    level_allocation="auto",
    # No attention sink by default: on SmolLM2-135M it keeps the perplexity but moves 11 % of the
    # top-1 predictions (the prefix changes the function); "sink" and "auto" are options.
    outliers=(),
    float_operations=FLOAT_OPERATIONS,
)
