"""What a recipe is: a conversion described as data.

A `Recipe` names the architectures it serves, the spike coding and time steps,
the threshold rule, and a list of `Rule`s. Each rule matches modules by class
name and by a regular expression on the module's dotted name, and says which
replacement (see `ann2snn.replace.REPLACEMENTS`) takes its place and, where
the replacement holds neurons, which statistic sets their thresholds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..coding import SpikeCode
from ..errors import ConfigError
from ..transforms import check_transforms


LEVEL_ALLOCATIONS = ("uniform", "auto")
# What level_allocation "auto" may add to the PPL ratio SNN/ANN on text unlike the calibration text when not told
# otherwise (calibration/levels.py: on the calibration windows it keeps the KL it adds within ln R / UNLIKE_TEXT_MARGIN,
# and within UNIFORM_KL_FACTOR x the uniform model's own). Measured at T=8 (docs/benchmarks.md, "Per-site levels"):
# embedded model 0.392 @ 0.9984 held-out / 1.0065 Moby-Dick; 1.0125 gives 0.382 but 1.0097 on Moby-Dick.
DEFAULT_MAX_PPL_RATIO = 1.01


@dataclass(frozen=True)
class Rule:
    pattern: str  # regular expression, matched against the full module name
    module_class: str  # part of the class name: "Linear", "Attention", "SiLU" (nn.SiLU, SiLUActivation)…
    replace_with: str  # a key of ann2snn.replace.REPLACEMENTS
    threshold: str | None = None  # overrides Recipe.threshold for these neurons
    # The modules this rule matches under one parent read the same tensor (q/k/v after one RMSNorm):
    # with Recipe.share_inputs they share one input neuron, calibrated at the first one's site.
    shared_input: bool = False


@dataclass(frozen=True)
class LevelDefault:
    """From `min_levels` levels per neuron up, the threshold rule and headroom the benchmarks found best."""

    min_levels: int
    threshold: str
    headroom: float


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_types: tuple[str, ...]  # config.model_type values this recipe converts
    rules: tuple[Rule, ...]
    coding: str = "phase"
    timesteps: int = 8
    threshold: str | None = None  # None: from level_defaults
    headroom: float | None = None  # clip = headroom × the rule's clip; None: from level_defaults
    # Per-channel maxima from a few thousand calibration tokens understate what unseen text reaches
    # (on SmolLM2-135M, 10 % of down_proj channels by ≥ 1.36×, some by 7×); with many levels a
    # margin costs a bit or two of resolution and saves the clipping. Ordered by min_levels.
    level_defaults: tuple[LevelDefault, ...] = ()
    # High-order phase steps per site (coding.py): "auto" (at heavy-tailed sites, from the calibration
    # statistics: calibration.thresholds.range_steps) or the same number at every site; 0 = none.
    range_steps: str | int = 0
    # Time steps per site (calibration/levels.py, `--levels`): "uniform" (every site gets `timesteps`) or "auto" (each site
    # the fewest of 2..timesteps that the output allows, the lowest-energy allocation under one budget: a
    # measured PPL ratio on the calibration windows, `max_ppl_ratio`, or an SNN/ANN energy, `energy_budget`).
    level_allocation: str = "uniform"
    max_ppl_ratio: float | None = None  # None with level_allocation "auto": DEFAULT_MAX_PPL_RATIO (unless energy_budget)
    energy_budget: float | None = None
    outliers: tuple[str, ...] = ()  # "rotate", "smooth", "sink", or "auto" (sink where massive first-token activations show)
    # One input neuron per group of Rule.shared_input modules: the same values, spikes fired once for all readers.
    # Off only to load exports written before it (format < 4), whose readers may hold fine-tuned Δ of their own.
    share_inputs: bool = True
    # The output layer as a Synapsis too (its input neuron calibrated at the final norm's output, as any other);
    # head_rules say which module that is. Off: lm_head stays a float matmul.
    spiking_head: bool = False
    head_rules: tuple[Rule, ...] = ()
    # Time steps of the head's input neuron beyond `timesteps` (calibration/head.py): "auto" (as many as the head's
    # own measured effect on the calibration windows asks, up to head.MAX_EXTRA_STEPS) or a number (0: the head at T).
    head_steps: str | int = 0
    float_operations: tuple[str, ...] = field(default_factory=tuple)  # what stays in floating point, for users

    @property
    def active_rules(self) -> tuple[Rule, ...]:
        """The rules a conversion applies: `rules`, and `head_rules` with `spiking_head`."""
        return self.rules + (self.head_rules if self.spiking_head else ())

    def operations_in_float(self) -> tuple[str, ...]:
        """`float_operations` as this recipe converts: without "lm_head" when the head spikes."""
        return tuple(op for op in self.float_operations if not (self.spiking_head and op == "lm_head"))

    @property
    def code(self) -> SpikeCode:
        return SpikeCode(self.coding, self.timesteps)

    def with_options(self, **options) -> "Recipe":
        """A copy with the non-None options replaced (e.g. timesteps from the CLI); validated."""
        chosen = {k: v for k, v in options.items() if v is not None}
        unknown = set(chosen) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown recipe option(s): {', '.join(sorted(unknown))}")
        if "outliers" in chosen:
            chosen["outliers"] = check_transforms(chosen["outliers"])
        if "range_steps" in chosen:
            chosen["range_steps"] = _check_range_steps(chosen["range_steps"])
        if "head_steps" in chosen:
            chosen["head_steps"] = _check_head_steps(chosen["head_steps"])
        if "level_allocation" in chosen and chosen["level_allocation"] not in LEVEL_ALLOCATIONS:
            raise ConfigError(f"levels must be one of {', '.join(LEVEL_ALLOCATIONS)}, got {chosen['level_allocation']!r}")
        for key in ("max_ppl_ratio", "energy_budget"):
            value = chosen.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise ConfigError(f"{key.replace('_', '-')} must be a positive number, got {value!r}")
        if "max_ppl_ratio" in chosen and chosen["max_ppl_ratio"] < 1:
            raise ConfigError(f"max-ppl-ratio must be at least 1 (the SNN over the ANN), got {chosen['max_ppl_ratio']!r}")
        if "headroom" in chosen and not (isinstance(chosen["headroom"], (int, float)) and 1 <= chosen["headroom"] <= 1024):
            raise ConfigError(f"headroom must be a number from 1 to 1024, got {chosen['headroom']!r}")
        if ("max_ppl_ratio" in chosen or "energy_budget" in chosen) and "level_allocation" not in chosen:
            chosen["level_allocation"] = "auto"  # a budget asks for per-site levels; only an explicit "uniform" refuses it
        recipe = dataclasses.replace(self, **chosen)
        if recipe.max_ppl_ratio is not None and recipe.energy_budget is not None:
            raise ConfigError("give either max-ppl-ratio or energy-budget, not both")
        if recipe.level_allocation == "uniform" and (recipe.max_ppl_ratio is not None or recipe.energy_budget is not None):
            raise ConfigError("max-ppl-ratio and energy-budget choose per-site levels; they need levels auto, not uniform")
        recipe.code  # raises ConfigError on a bad coding / timesteps
        return recipe

    def with_uniform_levels(self) -> "Recipe":
        """This recipe with every site at its T (where no allocation can run: no calibration windows to measure on)."""
        return dataclasses.replace(self, level_allocation="uniform", max_ppl_ratio=None, energy_budget=None)

    def _level_default(self, code: SpikeCode | None = None) -> LevelDefault:
        chosen = LevelDefault(0, "mse", 1.0)
        for default in self.level_defaults:
            if (code or self.code).levels >= default.min_levels:
                chosen = default
        return chosen

    @property
    def chosen_threshold(self) -> str:
        return self.threshold_for(self.code)

    @property
    def chosen_headroom(self) -> float:
        return self.headroom_for(self.code)

    def threshold_for(self, code: SpikeCode) -> str:
        """The threshold rule of a site fired with `code` (a site with fewer steps than the recipe's T gets
        the level table's rule at its own levels, as a uniform conversion at its T would)."""
        return self.threshold or self._level_default(code).threshold

    def headroom_for(self, code: SpikeCode) -> float:
        return float(self.headroom if self.headroom is not None else self._level_default(code).headroom)

    @property
    def ppl_budget(self) -> float | None:
        """The PPL ratio an "auto" allocation keeps to (None: it keeps to `energy_budget`)."""
        if self.energy_budget is not None:
            return None
        return self.max_ppl_ratio if self.max_ppl_ratio is not None else DEFAULT_MAX_PPL_RATIO

    def summary(self) -> dict:
        return {
            "name": self.name,
            "coding": self.coding,
            "timesteps": self.timesteps,
            "levels": self.code.levels,
            "threshold": self.chosen_threshold,
            "headroom": self.chosen_headroom,
            "range_steps": self.range_steps,
            "level_allocation": self.level_allocation,
            "max_ppl_ratio": self.ppl_budget if self.level_allocation == "auto" else None,
            "energy_budget": self.energy_budget if self.level_allocation == "auto" else None,
            "outliers": list(self.outliers),
            "share_inputs": self.share_inputs,
            "spiking_head": self.spiking_head,
            "head_steps": self.head_steps,
            "rules": [dataclasses.asdict(rule) for rule in self.active_rules],
        }


def _check_range_steps(option) -> str | int:
    """"auto", or a whole number of steps from 0 to MAX_RANGE_STEPS (a CLI string is converted)."""
    from ..calibration.thresholds import MAX_RANGE_STEPS

    if option == "auto":
        return option
    whole = isinstance(option, int) and not isinstance(option, bool) or isinstance(option, str) and option.isdigit()
    if not whole or not 0 <= int(option) <= MAX_RANGE_STEPS:
        raise ConfigError(f"range steps must be \"auto\" or a whole number from 0 to {MAX_RANGE_STEPS}, got {option!r}")
    return int(option)


def _check_head_steps(option) -> str | int:
    """"auto", or a whole number of extra steps from 0 to head.MAX_EXTRA_STEPS (a CLI string is converted)."""
    from ..calibration.head import MAX_EXTRA_STEPS

    if option == "auto":
        return option
    whole = isinstance(option, int) and not isinstance(option, bool) or isinstance(option, str) and option.isdigit()
    if not whole or not 0 <= int(option) <= MAX_EXTRA_STEPS:
        raise ConfigError(f"head steps must be \"auto\" or a whole number from 0 to {MAX_EXTRA_STEPS}, got {option!r}")
    return int(option)
