"""Per-architecture conversion recipes, by name."""

from ..errors import ConfigError, UnsupportedModelError
from . import braintransformers, qwen2
from .base import Recipe, Rule

RECIPES: dict[str, Recipe] = {r.name: r for r in (qwen2.RECIPE, braintransformers.RECIPE)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def supported_families() -> list[str]:
    return sorted({t for r in RECIPES.values() for t in r.model_types})


def check_supported(recipe: Recipe, model_type: str | None) -> None:
    if model_type not in recipe.model_types:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by recipe {recipe.name!r}; "
            f"supported families: {', '.join(recipe.model_types)}"
        )


__all__ = ["RECIPES", "Recipe", "Rule", "get_recipe", "supported_families", "check_supported"]
