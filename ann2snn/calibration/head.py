"""The head's window: how many time steps lm_head's input neuron fires, measured at calibration.

The spike-driven lm_head (`Recipe.spiking_head`) reads the final norm's output
through one input neuron. At few time steps that neuron's rounding is what the
head costs, and it is resolution, not range: on SmolLM2-135M at T=6 the head at
T costs 0.5 % of held-out perplexity over a float head, and the same head with
one more step costs nothing measurable (docs/benchmarks.md, "The spiking
head's window"); no threshold rule or range step removes it. So the head's
neuron may fire more steps than the model's T, one more step doubling its
levels (phase code). That step costs spikes only at the head, and latency: one
step more at the last stage.

How many: the head's own effect on the output, measured on the calibration
windows (the first WINDOWS of those kept with the statistics) without running
the model again per candidate. The float network's head inputs x (spiking off,
so nothing else is quantised) go through the head twice, float and with x
quantised at the candidate T_h (the Δ that site gets at T_h: its threshold
rule and headroom at its own levels, `BuildContext.delta`), and

    divergence(T_h) = exp(mean KL(softmax(W·x + b) ‖ softmax(W·Q_{T_h}(x) + b))) − 1

per predicted token. The head gets the fewest steps from T up to
T + MAX_EXTRA_STEPS whose divergence is at most TOLERANCE (none meets it: the
one with the least). `Recipe.head_steps` a number instead fixes the extra
steps (0: the head at T, as before this rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..modules.neuron import SignedNeuron, set_simulation
from ..modules.synapsis import Synapsis

WINDOWS = 8  # calibration windows the head's inputs are taken from (as per-site levels measure on)
MAX_EXTRA_STEPS = 3
# The divergence the head alone may add (exp of its KL per token, minus 1). Measured (docs/benchmarks.md, "The
# spiking head's window"): it lies between what costs (SmolLM2-135M's head at 6 steps: 0.0032, +0.5 % of
# held-out perplexity over a float head) and what costs nothing measurable (its head at 7 or 8 steps: 0.0009, 0.0008).
TOLERANCE = 0.002
CHUNK = 128  # tokens per head product: the vocabulary-wide logits of a chunk are all that is held


def head_sites(ctx) -> dict[str, tuple[SignedNeuron, object]]:
    """The sites built by the recipe's head rules (lm_head's input neuron), site → (neuron, rule)."""
    return {site: (neuron, rule) for site, (neuron, rule) in ctx.neurons.items()
            if rule is not None and rule in ctx.recipe.head_rules}


def head_inputs(model, site: str, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The float network's inputs to the head at `site` over `windows` [N, L] (spiking off), as [tokens, hidden]."""
    synapsis: Synapsis = model.get_submodule(site)
    captured = []
    handle = synapsis.neuron.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(0, -2)))
    device = next(model.parameters()).device
    set_simulation(model, "ann")
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        set_simulation(model, "fast")
    return torch.cat(captured)


@torch.no_grad()
def divergence(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, code, delta: torch.Tensor) -> float:
    """exp(mean KL(float head ‖ head on x quantised by `code` at `delta`)) − 1 over the rows of x [tokens, in]."""
    kl = 0.0
    for start in range(0, x.shape[0], CHUNK):
        rows = x[start:start + CHUNK].to(weight.dtype)
        reference = torch.log_softmax(F.linear(rows, weight, bias).float(), -1)
        quantised = torch.log_softmax(F.linear(code.quantise(rows, delta.to(rows.device)), weight, bias).float(), -1)
        kl += float((reference.exp() * (reference - quantised)).sum())
    return math.expm1(kl / x.shape[0])


def choose(ctx, site: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, dict]:
    """The head site's T by the recipe's `head_steps` ("auto": measured on its inputs `x`; a number: T + it),
    and what was measured."""
    top = ctx.recipe.timesteps
    if ctx.recipe.head_steps != "auto":
        return top + ctx.recipe.head_steps, {"rule": ctx.recipe.head_steps, "timesteps": top + ctx.recipe.head_steps}
    _, rule = ctx.neurons[site]
    measured = {}
    for t in range(top, top + MAX_EXTRA_STEPS + 1):
        measured[t] = divergence(x, weight, bias, ctx.code_for(site, t), ctx.delta(site, rule, t))
        if measured[t] <= TOLERANCE:
            break
    chosen = next((t for t, d in measured.items() if d <= TOLERANCE), min(measured, key=measured.get))
    return chosen, {"rule": "auto", "timesteps": chosen, "tolerance": TOLERANCE, "tokens": int(x.shape[0]),
                    "divergence": {str(t): d for t, d in measured.items()}}


def fit_head(model, ctx, windows: torch.Tensor | None = None, inputs: torch.Tensor | None = None
             ) -> tuple[dict[str, int], dict | None]:
    """Give each head site of the converted `model` (built by `ctx` at the recipe's T) its window by the recipe's
    `head_steps`, measured on the head's inputs over `windows` (the calibration windows), or on `inputs` [tokens,
    hidden] where the caller has them (layer-by-layer conversion); "auto" needs one of them, a number neither. The
    neurons are recoded. Returns (site → T, what was measured per site)."""
    sites = head_sites(ctx)
    if not sites:
        return {}, None
    chosen, summary = {}, {}
    for site in sites:
        synapsis = model.get_submodule(site)
        x = inputs
        if x is None and ctx.recipe.head_steps == "auto":
            x = head_inputs(model, site, windows[:WINDOWS])
        chosen[site], summary[site] = choose(ctx, site, x, synapsis.weight, synapsis.bias)
        recode(ctx, site, chosen[site])
    return chosen, summary


def recode(ctx, site: str, timesteps: int) -> None:
    """The site's neuron fires `timesteps` from now on (its code and Δ at that T), and `ctx` says so."""
    neuron, rule = ctx.neurons[site]
    neuron.recode(ctx.code_for(site, timesteps), ctx.delta(site, rule, timesteps))
    ctx.timesteps = {**(ctx.timesteps or {}), site: timesteps}
