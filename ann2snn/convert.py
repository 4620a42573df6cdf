"""The conversion of a model in memory: calibrate → swap modules by the recipe's rules.

The whole pipeline, with its checks, resume files, fine-tune and export, is `ann2snn.convert_and_export`
(pipeline.py, what `ann2snn convert` runs); these are its stages for a model already loaded:

    import ann2snn
    model, tokenizer = ann2snn.load_ann("qwen2-tiny")
    snn = ann2snn.convert(model, tokenizer, timesteps=8)
    ann2snn.save(snn, "out/qwen2-tiny-snn", tokenizer)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .attention_sink import attached, compute_sinks, resolve_outliers
from .calibration.calibrate import PROBE, WINDOWS, collect_statistics, load_statistics
from .calibration.data import calibration_windows, probe_windows
from .calibration.head import fit_head
from .calibration.thresholds import range_steps
from .recipes import check_supported, get_recipe
from .recipes.base import Recipe
from .errors import CheckpointError, ConfigError
from .models import check_seq_len
from .replace import REPLACEMENTS, matches, swap_modules
from .transforms import rotate, smooth


def convert(model, tokenizer=None, *, recipe: str | Recipe = "qwen2", timesteps: int | None = None,
            coding: str | None = None, threshold: str | None = None, headroom: float | None = None,
            outliers: tuple[str, ...] | None = None, range_steps: str | int | None = None, head_steps: str | int | None = None,
            levels: str | None = None, max_ppl_ratio: float | None = None, energy_budget: float | None = None, calib_data: str | Path | None = None,
            calib_samples: int = 32, seq_len: int = 128, calib_stats: str | Path | None = None,
            statistics: dict | None = None, calibration_info: dict | None = None, seed: int = 0, progress: bool = True):
    """Convert a transformers causal LM (Qwen2 / Llama / Mistral) into an SNN, in place; returns it.

    Calibration runs the ANN over `calib_samples` windows of `seq_len` tokens of
    `calib_data` (default: the bundled English text) unless statistics are given
    (`statistics`, or a saved `calib_stats` file). `timesteps`, `coding`,
    `threshold`, `headroom`, `outliers` (a tuple of "rotate", "smooth",
    "sink", or ("auto",)) and `range_steps` ("auto" or a number of high-order
    phase steps per site, see `ann2snn.coding`) override the recipe's defaults. `head_steps` ("auto" or a number)
    gives the spiking lm_head's input neuron steps beyond `timesteps` (`ann2snn.calibration.head`).

    `levels` "auto" (the qwen2 recipe's default; a budget implies it) gives each site the fewest time steps, at
    most `timesteps`, that keep what the PPL ratio SNN/ANN may gain on text unlike the calibration text within
    `max_ppl_ratio` (default `recipe.base.DEFAULT_MAX_PPL_RATIO`; kept as the KL added on the calibration windows
    and on the bundled probe text's, with margins), or that keep the SNN/ANN energy (view i) within
    `energy_budget`; "uniform" gives every site `timesteps` (`ann2snn.calibration.levels`).
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    recipe = recipe.with_options(timesteps=timesteps, coding=coding, threshold=threshold, headroom=headroom, outliers=outliers,
                                 range_steps=range_steps, head_steps=head_steps, level_allocation=levels, max_ppl_ratio=max_ppl_ratio,
                                 energy_budget=energy_budget)
    check_supported(recipe, getattr(model.config, "model_type", None))
    check_is_ann(model)
    torch.manual_seed(seed)
    calibration = dict(calibration_info or {"seed": seed})
    if statistics is None and calib_stats is not None:
        statistics, saved = load_statistics(calib_stats)
        calibration.update(saved, reused_from=str(calib_stats))
    elif statistics is None:
        if tokenizer is None:
            raise ValueError("convert needs the tokenizer to calibrate (or statistics / calib_stats)")
        statistics, calibration = calibrate(model, tokenizer, recipe, calib_data, calib_samples, seq_len, seed, progress)
    if recipe.outliers == ("auto",):  # decided by the calibration pass (attention_sink.resolve_outliers)
        recipe = recipe.with_options(outliers=tuple(calibration.get("transforms", ())))
    gathered = tuple(calibration.get("transforms", recipe.outliers))
    if set(gathered) != set(recipe.outliers):  # statistics of rotated/smoothed weights, or with a sink, fit only those
        named = ",".join(gathered) or "none"
        raise CheckpointError(f"these calibration statistics were gathered with --outliers {named}; pass --outliers "
                              f"{named} or recalibrate (drop --calib-stats)")
    _replay_transforms(model, recipe, statistics, calibration.get("seed", seed))
    check_sites(matches(model, recipe), statistics)
    sinks = compute_sinks(model) if "sink" in recipe.outliers else None  # from the final (transformed) weights
    if recipe.level_allocation == "auto" and WINDOWS not in calibration:
        warnings.warn("these calibration statistics hold no token windows (saved before per-site levels), so every "
                      f"site gets T={recipe.timesteps}; recalibrate (drop --calib-stats) for per-site levels")
        recipe = recipe.with_uniform_levels()
    elif recipe.level_allocation == "auto" and PROBE not in calibration:
        warnings.warn("these calibration statistics hold no probe windows (saved before per-site levels were checked on "
                      "the bundled probe text), so the allocation is checked on the calibration text alone; recalibrate "
                      "(drop --calib-stats) for the probe")
    if recipe.spiking_head and recipe.head_steps == "auto" and WINDOWS not in calibration:
        warnings.warn("these calibration statistics hold no token windows (saved before the head's window was "
                      f"measured), so lm_head's input neuron gets T={recipe.timesteps}; recalibrate (drop --calib-stats) "
                      "for its own window")
        recipe = recipe.with_options(head_steps=0)
    ctx = swap_modules(model, recipe, statistics, sinks)
    site_timesteps, head = fit_head(model, ctx, calibration.get(WINDOWS))
    allocation = None
    if recipe.level_allocation == "auto":  # from every site at its T, the head at its own: sites may go lower
        from .calibration.levels import allocate

        site_timesteps, allocation = allocate(model, ctx, calibration[WINDOWS], calibration.get(PROBE))
    model.ann2snn = export_metadata(recipe, calibration, statistics, site_timesteps, allocation, head)
    return model.eval()


def export_metadata(recipe: Recipe, calibration: dict, statistics: dict, site_timesteps: dict[str, int] | None = None,
                    allocation: dict | None = None, head: dict | None = None) -> dict:
    """What a converted model carries into its export (snn_config.json, calibration.safetensors).

    `range_steps` lists the sites with high-order range steps (coding.py) and how many: each of those
    sites fires in a window of that many more steps than its T (its latency, in the export's
    config); `site_timesteps` the sites whose T is not the recipe's and that T (below it: per-site levels; above
    it: the spiking head's input neuron, `calibration.head`), `allocation` what the per-site allocation measured
    and `head` what the head's window was chosen from; `load` rebuilds the sites' codes from these."""
    steps = {site: range_steps(stats, recipe.range_steps, recipe.code) for site, stats in sorted(statistics.items())}
    own = {site: t for site, t in sorted((site_timesteps or {}).items()) if t != recipe.timesteps}
    return {"recipe": recipe.summary(), "float_operations": list(recipe.operations_in_float()),
            "range_steps": {site: k for site, k in steps.items() if k}, "site_timesteps": own,
            "allocation": allocation, "head": head, "calibration": calibration, "versions": _versions(),
            "statistics": statistics}


def calibration_summary(calib_data, windows: torch.Tensor, seed: int, outliers: tuple[str, ...], **notes) -> dict:
    """The calibration entry of snn_config.json."""
    return {"seed": seed, "source": str(calib_data) if calib_data else "bundled", "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "tokens": int(windows.numel()), "transforms": list(outliers), **notes}


def calibrate(model, tokenizer, recipe: str | Recipe = "qwen2", calib_data: str | Path | None = None,
              calib_samples: int = 32, seq_len: int = 128, seed: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """Run the ANN over the calibration text; returns (statistics, a summary for snn_config.json)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    check_is_ann(model)
    check_seq_len(model.config, seq_len)
    windows = calibration_windows(tokenizer, calib_data, calib_samples, seq_len, seed)
    outliers, sink_note = resolve_outliers(model, recipe.outliers, windows[0])
    recipe = recipe.with_options(outliers=outliers)
    if "rotate" in recipe.outliers and "rotate" not in _applied(model):
        rotate(model, seed)
        _applied(model).append("rotate")
    statistics = _collect(model, recipe, windows, seed, progress)
    if "smooth" in recipe.outliers and "smooth" not in _applied(model):
        smooth(model, statistics)
        _applied(model).append("smooth")
        before = {site: stats["absmax"] for site, stats in statistics.items()}
        statistics = _collect(model, recipe, windows, seed, progress)
        for site, absmax in before.items():  # kept so that reused statistics can replay the same smoothing
            statistics[site]["absmax_before_smoothing"] = absmax
    # the windows go with the statistics (calibrate.WINDOWS, PROBE): per-site levels are measured on them
    return statistics, {**calibration_summary(calib_data, windows, seed, recipe.outliers, **sink_note), WINDOWS: windows,
                        PROBE: probe_windows(tokenizer, seq_len)}


def check_is_ann(model) -> None:
    """Refuse a model that is already an SNN. Conversion works in place, so a second `convert` of the same object
    would calibrate the first SNN's outputs and swap what is left: no error, a worse SNN (qwen2-tiny, T = 4 then 8:
    NLL 4.674 against 4.527 converted once), and benchmarks that looped over T did that unseen."""
    if getattr(model, "ann2snn", None) is not None or any(
            type(module).__module__.startswith(__package__ + ".modules") for module in model.modules()):
        raise ConfigError("this model is already an SNN (convert works in place); convert the ANN itself: load it "
                          "again (ann2snn.load_ann) or pass copy.deepcopy(ann) to each convert")


def _collect(model, recipe: Recipe, windows: torch.Tensor, seed: int, progress: bool) -> dict:
    """Statistics of the current weights, with the attention sink attached when the recipe uses one."""
    sinks = compute_sinks(model) if "sink" in recipe.outliers else None
    with attached(model, sinks):
        return collect_statistics(model, recipe, windows, seed=seed, progress=progress)


def _applied(model) -> list[str]:
    """The outlier transforms already folded into this model's weights."""
    if not hasattr(model, "ann2snn_transforms"):
        model.ann2snn_transforms = []
    return model.ann2snn_transforms


def _replay_transforms(model, recipe: Recipe, statistics: dict, seed: int) -> None:
    """Apply the recipe's transforms that reused statistics were gathered after (same seed, same scales)."""
    if "rotate" in recipe.outliers and "rotate" not in _applied(model):
        rotate(model, seed)
        _applied(model).append("rotate")
    if "smooth" in recipe.outliers and "smooth" not in _applied(model):
        if not all("absmax_before_smoothing" in stats for stats in statistics.values()):
            raise CheckpointError("these calibration statistics were gathered without smoothing; recalibrate (drop --calib-stats) or convert without smoothing")
        smooth(model, {site: {"absmax": stats["absmax_before_smoothing"]} for site, stats in statistics.items()})
        _applied(model).append("smooth")


def check_sites(found: list, statistics: dict) -> None:
    """Refuse statistics that lack a site the modules in `found` (from `matches`) need."""
    needed = [site for name, module, rule in found for site in REPLACEMENTS[rule.replace_with].sites(name, module)]
    missing = [site for site in needed if site not in statistics]
    if missing:
        raise CheckpointError(f"the calibration statistics lack {len(missing)} site(s) this model needs "
                              f"(e.g. {missing[0]}); recalibrate without --calib-stats")


def _versions() -> dict[str, str]:
    import spikingjelly
    import transformers

    from . import __version__

    return {"ann2snn": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "spikingjelly": getattr(spikingjelly, "__version__", "2.0.0")}
