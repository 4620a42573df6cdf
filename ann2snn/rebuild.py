"""An export converted again at another number of time steps, from its own weights and calibration statistics.

`ann2snn report --timesteps 4,8` runs the export itself at its own T and, for
any other T, the model this module rebuilds: the export's ANN (`ann_from_export`:
the original architecture holding the export's weights, neurons removed)
converted again with the saved statistics, as `convert --calib-stats` would.
A fine-tuned export is refused: its thresholds (and, with --train-weights, its
weights) moved away from what calibration gave, and a rebuild would silently
start again from calibration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .export import CALIBRATION_FILE, _read_weights, read_snn_config, verify
from .placement import place


def ann_from_export(folder: str | Path):
    """The export's original ANN: a plain transformers model holding the export's weights (neurons removed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; pass the --out folder of ann2snn convert")
    config = read_snn_config(folder)
    verify(folder, config)
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(model_config, "dtype", None) or torch.float32)
    state = {}
    for key, value in _read_weights(folder, config).items():
        if ".synapse." in key:  # a Synapsis holds its Linear's weight and bias under .synapse
            state[key.replace(".synapse.", ".")] = value
        elif ".snn.sink_" in key:  # the attention sink's constants: recomputed from the ANN when rebuilt
            continue
        elif not (key.endswith(".delta") and (".neuron." in key or ".snn." in key or "_neuron." in key)):
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        problems = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise CheckpointError(f"cannot rebuild the ANN of {folder} ({', '.join(problems)}); the export is damaged")
    model.tie_weights()
    return model.eval()


def check_timesteps(folder: str | Path, timesteps: list[int]) -> None:
    """Refuse, before any work, a T the export's coding cannot hold, or any other T for a fine-tuned export."""
    from .recipes import get_recipe

    config = read_snn_config(Path(folder))
    options = config["recipe"]
    recipe = get_recipe(options.get("name", "qwen2"))
    for t in timesteps:
        recipe.with_options(coding=options.get("coding"), timesteps=t, threshold=options.get("threshold"))
    own = options["timesteps"]
    others = [t for t in timesteps if t != own]
    if others and config.get("finetune"):
        _refuse_finetuned(folder, config, others[0])


def _refuse_finetuned(folder, config: dict, timesteps: int) -> None:
    own = config["recipe"]["timesteps"]
    rule = (config.get("finetune") or {}).get("rule", "a rule")
    raise ConfigError(f"{folder} was fine-tuned ({rule}) at T={own}; at T={timesteps} it would be rebuilt from its "
                      f"calibration statistics and lose the fine-tune: report it at T={own} (omit --timesteps), or "
                      f"convert at T={timesteps} and fine-tune that")


def rebuild_at(folder: str | Path, timesteps: int, seed: int = 0, device_map: str | None = None):
    """The export converted again at `timesteps`, from its own weights and calibration statistics, placed by `device_map`.

    Thresholds: an export whose rule and headroom are the recipe's level-table
    defaults at its own T is rebuilt with the table's defaults at `timesteps`
    (as `convert --timesteps` would choose them); any other rule and headroom are kept, and so is its
    range-step option (an export from before range steps has none) and its head-steps option (the head's window
    measured again at `timesteps` with "auto"; an export from before it has its head at T). Per-site levels ("auto") are allocated
    again at `timesteps`, under the export's own budget (its max-ppl-ratio or energy-budget), on its saved
    calibration windows: the export's own allocation is for its own T.
    """
    from .calibration.calibrate import load_statistics
    from .convert import convert
    from .recipes import get_recipe

    folder = Path(folder)
    config = read_snn_config(folder)
    if config.get("finetune"):
        _refuse_finetuned(folder, config, timesteps)
    options = config["recipe"]
    # the export's own structure too (absent before format 4: one input neuron per Synapsis, a float head)
    own = get_recipe(options.get("name", "qwen2")).with_options(
        coding=options.get("coding"), timesteps=options.get("timesteps"),
        share_inputs=bool(options.get("share_inputs", False)), spiking_head=bool(options.get("spiking_head", False)))
    chosen = (options.get("threshold"), options.get("headroom"))
    threshold, headroom = (None, None) if chosen == (own.chosen_threshold, own.chosen_headroom) else chosen
    stats_file = folder / CALIBRATION_FILE
    if not stats_file.is_file():
        raise CheckpointError(f"{folder} has no {CALIBRATION_FILE}, so it cannot be rebuilt at T={timesteps}; "
                              "report at the export's own T (omit --timesteps)")
    statistics, info = load_statistics(stats_file)
    ann = ann_from_export(folder)
    extra = {}
    outliers = tuple(options.get("outliers") or ())
    if outliers:
        # The export's weights already carry its outlier transforms: record them as applied so none is replayed.
        ann.ann2snn_transforms = list(outliers)
        extra["outliers"] = outliers
    # per-site levels: allocated again at `timesteps` under the export's own budget, as convert would (an export
    # from before them, or with uniform levels, stays uniform)
    snn = convert(ann, recipe=own, timesteps=timesteps, coding=options.get("coding"),
                  threshold=threshold, headroom=headroom, range_steps=options.get("range_steps", 0),
                  head_steps=options.get("head_steps", 0),
                  levels=options.get("level_allocation") or "uniform", max_ppl_ratio=options.get("max_ppl_ratio"),
                  energy_budget=options.get("energy_budget"), statistics=statistics,
                  calibration_info=info, seed=seed, progress=False, **extra)
    return place(snn, device_map)
