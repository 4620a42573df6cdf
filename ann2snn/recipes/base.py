"""What a recipe is: a conversion described as data.

A `Recipe` names the architectures it serves, the spike coding and time steps,
the threshold rule, and a list of `Rule`s. Each rule matches modules by class
name and by a regular expression on the module's dotted name, and says which
replacement (see `ann2snn.replace.REPLACEMENTS`) takes its place and, where
the replacement holds neurons, which statistic sets their thresholds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..coding import SpikeCode
from ..errors import ConfigError
from ..transforms import check_transforms


@dataclass(frozen=True)
class Rule:
    pattern: str  # regular expression, matched against the full module name
    module_class: str  # part of the class name: "Linear", "Attention", "SiLU" (nn.SiLU, SiLUActivation)…
    replace_with: str  # a key of ann2snn.replace.REPLACEMENTS
    threshold: str | None = None  # overrides Recipe.threshold for these neurons


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_types: tuple[str, ...]  # config.model_type values this recipe converts
    rules: tuple[Rule, ...]
    coding: str = "phase"
    timesteps: int = 8
    threshold: str = "mse"
    outliers: tuple[str, ...] = ()  # function-preserving rewrites before calibration: "rotate", "smooth"
    float_operations: tuple[str, ...] = field(default_factory=tuple)  # what stays in floating point, for users

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
        recipe = dataclasses.replace(self, **chosen)
        recipe.code  # raises ConfigError on a bad coding / timesteps
        return recipe

    def summary(self) -> dict:
        return {
            "name": self.name,
            "coding": self.coding,
            "timesteps": self.timesteps,
            "levels": self.code.levels,
            "threshold": self.threshold,
            "outliers": list(self.outliers),
            "rules": [dataclasses.asdict(rule) for rule in self.rules],
        }
