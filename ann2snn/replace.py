"""The module swap: apply a recipe's rules to a model.

`matches(model, recipe)` lists (name, module, rule) for every module a rule
takes. Each replacement kind says which activations it needs statistics for
(`sites`), how to watch them during calibration (`observe`) and how to build
its SNN module (`build`). Built without statistics (when loading an export),
neurons get placeholder steps that the export's weights then overwrite.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention_sink import sink_token_ids
from .calibration.thresholds import choose_clip, range_steps
from .coding import SpikeCode
from .modules.attention import ATTENTION_NAME, SpikingAttention
from .modules.neuron import DynamicNeuron, SignedNeuron
from .modules.silu import SNNSiLU
from .modules.staircase_silu import StaircaseSiLU
from .modules.synapsis import Synapsis
from .recipes.base import Recipe, Rule

CALIBRATION_ATTENTION = "ann2snn_calibrate"


@dataclass
class BuildContext:
    recipe: Recipe
    code: SpikeCode
    config: object  # the model's transformers config
    statistics: dict[str, dict[str, torch.Tensor]] | None
    sinks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # attention module name → sink (key, value)
    shared_neurons: dict = field(default_factory=dict)  # (parent name, rule) → the input neuron its readers share
    range_steps: dict[str, int] | None = None  # site → range steps, as an export recorded them; None: from statistics
    timesteps: dict[str, int] | None = None  # site → its T (calibration/levels.py); a site not listed: the recipe's
    # site → (its neuron, the rule that built it; None for SNNSoftmax, whose step is fixed), in build order
    neurons: dict[str, tuple[SignedNeuron, Rule | None]] = field(default_factory=dict)

    def code_for(self, site: str, timesteps: int | None = None) -> SpikeCode:
        """The site's code at its T (or at `timesteps`): the recipe's coding, with the site's range steps in front."""
        base = self.base_code(site, timesteps)
        if self.range_steps is not None:
            return base.with_range_steps(self.range_steps.get(site, 0))
        if self.statistics is None or site not in self.statistics:  # no statistics: SNNSoftmax, or an export
            return base
        return base.with_range_steps(range_steps(self.statistics[site], self.recipe.range_steps, base))

    def base_code(self, site: str, timesteps: int | None = None) -> SpikeCode:
        """The site's code without range steps: the recipe's coding over the site's T."""
        t = timesteps or (self.timesteps or {}).get(site, self.code.timesteps)
        return self.code if t == self.code.timesteps else SpikeCode(self.code.name, t)

    def delta(self, site: str, rule: Rule, timesteps: int | None = None) -> torch.Tensor | None:
        """The site's Δ at its T (or at `timesteps`), by the threshold rule and headroom of its levels."""
        if self.statistics is None:
            return None
        return self.code_for(site, timesteps).delta_for(self.clip(site, rule, timesteps))

    def clip(self, site: str, rule: Rule, timesteps: int | None = None) -> torch.Tensor:
        """The largest value the site's levels reach at its T (or at `timesteps`): the threshold rule's clip at
        those levels, times their headroom."""
        base = self.base_code(site, timesteps)
        code = self.code_for(site, timesteps)  # the clip search sees the range the steps add (what clipping still costs)
        clip = choose_clip(self.statistics[site], rule.threshold or self.recipe.threshold_for(base), code)
        return clip * self.recipe.headroom_for(base)


class Replacement:
    """One kind of SNN replacement; subclasses fill in what they need."""

    def sites(self, name: str, module: nn.Module) -> list[str]:
        """Names of the activations this replacement needs statistics for."""
        return []

    def observe(self, name: str, module: nn.Module, observers: dict) -> list:
        return []

    def build(self, name: str, module: nn.Module, rule: Rule, ctx: BuildContext) -> nn.Module:
        raise NotImplementedError


def _observe_input(name: str, module: nn.Module, observers: dict) -> list:
    observer = observers[name]
    return [module.register_forward_pre_hook(lambda _m, args: observer.update(args[0]))]


class SynapsisReplacement(Replacement):
    """Every reader keeps its own site (statistics serve either way); a shared group's Δ is its first reader's.

    Readers of one tensor see identical statistics (the observers' reservoirs are
    seeded alike), so the first one's Δ is every one's: sharing changes no value.
    """

    def sites(self, name, module):
        return [name]

    def observe(self, name, module, observers):
        return _observe_input(name, module, observers)

    def build(self, name, module, rule, ctx):
        group = (name.rpartition(".")[0], rule) if rule.shared_input and ctx.recipe.share_inputs else None
        neuron = ctx.shared_neurons.get(group)
        if neuron is not None:  # readers of one tensor share its statistics, so its Δ and range steps too
            neuron.readers += 1
            return Synapsis(module, neuron.code, neuron=neuron)
        synapsis = Synapsis(module, ctx.code_for(name), ctx.delta(name, rule))
        ctx.neurons[name] = (synapsis.neuron, rule)
        if group is not None:
            ctx.shared_neurons[group] = synapsis.neuron
        return synapsis


class SNNSiLUReplacement(Replacement):
    def sites(self, name, module):
        return [name]

    def observe(self, name, module, observers):
        return _observe_input(name, module, observers)

    def build(self, name, module, rule, ctx):
        silu = SNNSiLU(ctx.code_for(name), ctx.config.intermediate_size, ctx.delta(name, rule))
        ctx.neurons[name] = (silu.neuron, rule)
        return silu


class SpikingAttentionReplacement(Replacement):
    """Keeps the transformers attention module (projections, RoPE, cache) and adds `.snn`."""

    def sites(self, name, module):
        return [f"{name}.{part}" for part in "qkv"]

    def observe(self, name, module, observers):
        module.ann2snn_observers = {part: observers[f"{name}.{part}"] for part in "qkv"}
        return []

    def build(self, name, module, rule, ctx):
        config = ctx.config
        head_dim = module.head_dim
        sink_tokens = len(sink_token_ids(config)) if "sink" in ctx.recipe.outliers else 0
        module.snn = SpikingAttention(
            ctx.code_for(f"{name}.softmax"), config.num_attention_heads, config.num_key_value_heads, head_dim,
            ctx.delta(f"{name}.q", rule), ctx.delta(f"{name}.k", rule), ctx.delta(f"{name}.v", rule),
            sink=(ctx.sinks or {}).get(name), sink_tokens=sink_tokens,
            qkv_codes=tuple(ctx.code_for(f"{name}.{part}") for part in "qkv"),
        )
        for part in "qkv":
            ctx.neurons[f"{name}.{part}"] = (getattr(module.snn, f"{part}_neuron"), rule)
        ctx.neurons[f"{name}.softmax"] = (module.snn.softmax.neuron, None)  # its Δ: clip 1 at any T (attention.py)
        return module


class DynamicSynapsisReplacement(Replacement):
    """The BrainTransformers baseline's Synapsis: per-call max/L scales on input and output."""

    def build(self, name, module, rule, ctx):
        synapsis = Synapsis(module, ctx.code, neuron=DynamicNeuron(ctx.code))
        synapsis.output_neuron = DynamicNeuron(ctx.code)
        return synapsis


class StaircaseSiLUReplacement(Replacement):
    def build(self, name, module, rule, ctx):
        return StaircaseSiLU()


REPLACEMENTS: dict[str, Replacement] = {
    "synapsis": SynapsisReplacement(),
    "snn_silu": SNNSiLUReplacement(),
    "spiking_attention": SpikingAttentionReplacement(),
    "dynamic_synapsis": DynamicSynapsisReplacement(),
    "staircase_silu": StaircaseSiLUReplacement(),
}


def matches(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, Rule]]:
    """Every (name, module, rule) the recipe takes; the first matching rule wins."""
    found = []
    for name, module in model.named_modules():
        for rule in recipe.active_rules:
            if rule.module_class in type(module).__name__ and re.fullmatch(rule.pattern, name):
                found.append((name, module, rule))
                break
    return found


def _device_of(model: nn.Module, name: str) -> torch.device:
    """The device of the named module's first parameter or buffer, else of its nearest ancestor's (SiLU has none)."""
    while True:
        module = model.get_submodule(name)
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        if tensor is not None or not name:
            return tensor.device if tensor is not None else torch.device("cpu")
        name = name.rpartition(".")[0]


def apply_recipe(model: nn.Module, recipe: Recipe, statistics: dict | None, sinks: dict | None = None,
                 within: str = "", range_steps: dict[str, int] | None = None,
                 site_timesteps: dict[str, int] | None = None) -> nn.Module:
    """Swap in the recipe's SNN modules, in place; returns the model (`swap_modules` returns what it built).

    `sinks` (from `attention_sink.compute_sinks`) fills the attention sink's
    constants; without them (loading an export) they are placeholders that the
    export's weights overwrite. `within` (a module name such as
    "model.layers.3", or "lm_head") limits the swap to that module and what it
    holds (layer-by-layer conversion). `range_steps` (site → steps, from an export's
    snn_config.json) gives the sites' range steps when there are no statistics to
    derive them from; `site_timesteps` (site → T) the sites' own T, where it is below the recipe's.
    """
    swap_modules(model, recipe, statistics, sinks, within, range_steps, site_timesteps)
    return model


def swap_modules(model: nn.Module, recipe: Recipe, statistics: dict | None, sinks: dict | None = None,
                 within: str = "", range_steps: dict[str, int] | None = None,
                 site_timesteps: dict[str, int] | None = None) -> BuildContext:
    """`apply_recipe`, returning its `BuildContext`: which neuron each site got (`neurons`)."""
    ctx = BuildContext(recipe, recipe.code, model.config, statistics, sinks, range_steps=range_steps,
                       timesteps=site_timesteps)
    found = [m for m in matches(model, recipe) if not within or m[0] == within or m[0].startswith(within + ".")]
    if not found:
        raise RuntimeError(f"recipe {recipe.name!r} matched no module of {type(model).__name__}")
    for name, module, rule in found:
        replacement = REPLACEMENTS[rule.replace_with].build(name, module, rule, ctx)
        if replacement is not module:
            parent_name, _, child = name.rpartition(".")
            # built from CPU statistics: the new buffers go where the replaced module runs (a placed model stays placed)
            replacement.to(_device_of(model, name))
            setattr(model.get_submodule(parent_name), child, replacement)
    if any(rule.replace_with == "spiking_attention" for _, _, rule in found):
        model.config._attn_implementation = ATTENTION_NAME
    _retarget_tied_weights(model, {name for name, _, rule in found if rule.replace_with == "synapsis"})
    return ctx


def _retarget_tied_weights(model: nn.Module, synapses: set[str]) -> None:
    """A tied output embedding that became a Synapsis stays tied: `lm_head.weight` is now `lm_head.synapse.weight`.

    transformers re-ties by these names (`tie_weights`, at load); the old name
    would no longer be settable on the Synapsis.
    """
    tied = getattr(model, "_tied_weights_keys", None)
    if not tied or not any(target.rpartition(".")[0] in synapses for target in tied):
        return
    renamed = {}
    for target, source in tied.items():
        module, _, parameter = target.rpartition(".")
        renamed[f"{module}.synapse.{parameter}" if module in synapses else target] = source
    model._tied_weights_keys = renamed
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
