"""The pipelines the commands run, one library call each: `ann2snn convert|finetune|generate|eval` only parse
options, call one of these and print what it returns.

`convert_and_export` plays the role of llm-compressor's `oneshot`: model, text, recipe and options in, a
verified export out, resumable:

    import ann2snn
    summary = ann2snn.convert_and_export("qwen2-tiny", "tiny-snn", timesteps=8)

It runs, in order:

1. every cheap check before anything loads: the output location (`export.check_output`: what `overwrite`
   may replace, whether the folder can be written), the recipe's options, the text files, the fine-tune's
   options, the window length against the model's positions;
2. the ANN is loaded (under torchrun every process joins the group, each on its own device);
3. calibration — or its statistics from an interrupted run, kept beside the output as
   `.OUT.calibration.safetensors` (used only when model, text, windows, seed and outlier handling are the
   same), or saved statistics (`calib_stats`);
4. the recipe swaps in the SNN modules (`ann2snn.convert`);
5. with `finetune`, the fine-tune (`ann2snn.finetune`), its checkpoint kept in `.OUT.finetune/`;
6. the atomic export (`ann2snn.save`); then the resume files go.

Rerunning an interrupted or failed call with the same arguments resumes from what step 3 and step 5 kept;
an interruption after they kept something raises `Interrupted` naming it. `layer_by_layer=True` runs
`ann2snn.layerwise.convert_layer_by_layer` instead (one decoder layer in memory at a time).

`finetune_export` fine-tunes an export into a new one (resuming the same way), `generate_text` and
`evaluate_export` run an export. `progress=False` hides the progress bars; notes (what is resumed) go to
stderr; too little text is a `TooLittleTextWarning`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .atomic import as_os_error, write_failure
from .calibration.calibrate import TOKEN_WINDOWS, load_statistics, save_statistics
from .calibration.data import calibration_windows, check_enough_text, read_texts, token_windows
from .errors import CheckpointError, ConfigError, Interrupted
from .export import CALIBRATION_FILE, check_output, load, save
from .finetune.core import CHECKPOINT_FILE, RULES, check_rule_options
from .models import check_seq_len, load_tokenizer_from, parse_dtype, read_config, resolve_model
from .placement import check_device_map
from .recipes import get_recipe

FINETUNE_RULE, FINETUNE_STEPS = "distill", 200  # convert's fine-tune when not told otherwise


def convert_and_export(model: str | Path, out: str | Path, *, recipe: str = "qwen2", timesteps: int | None = None,
                       coding: str | None = None, threshold: str | None = None, headroom: float | None = None,
                       outliers: tuple[str, ...] | None = None, range_steps: str | int | None = None,
                       head_steps: str | int | None = None, levels: str | None = None, max_ppl_ratio: float | None = None, energy_budget: float | None = None,
                       calib_data: str | Path | None = None, calib_samples: int = 32, seq_len: int = 128, calib_stats: str | Path | None = None,
                       dtype: str | torch.dtype | None = None, seed: int = 0, overwrite: bool = False,
                       trust_remote_code: bool = False, finetune: bool = False, finetune_data: str | Path | None = None,
                       finetune_steps: int | None = None, finetune_rule: str | None = None, layer_by_layer: bool = False,
                       device_map: str | None = "cpu", progress: bool = True) -> dict | None:
    """Convert `model` (a checkpoint folder, a hub id, a short name or 'qwen2-tiny') and export it to `out`.

    Options as `ann2snn.convert` and the `ann2snn convert` command; `overwrite` replaces an existing export or
    empty folder at `out` (nothing else). Returns a summary: out, model, recipe (as in snn_config.json),
    range_steps (site → the high-order steps it got), site_timesteps (site → its T, where not the recipe's), head
    (how the spiking head's window was chosen, or None), allocation (what the per-site allocation measured, or None), outliers_asked, calibration, resumed (what was resumed) and finetune (the fine-tune's figures, or None).
    Under torchrun only the first process writes and returns the summary; the others return None.
    """
    out = Path(out)
    check_output(out, overwrite)
    options = dict(timesteps=timesteps, coding=coding, threshold=threshold, headroom=headroom,
                   outliers=None if outliers is None else tuple(outliers), range_steps=range_steps,
                   head_steps=head_steps, levels=levels,
                   max_ppl_ratio=max_ppl_ratio, energy_budget=energy_budget)
    chosen = get_recipe(recipe).with_options(**{"level_allocation" if k == "levels" else k: v for k, v in options.items()})
    device_map = check_device_map(_process_device(device_map))
    if calib_stats is None:
        read_texts(calib_data)  # a missing or unreadable file is found before the model is
    finetune_texts = _check_finetune_options(finetune, finetune_data, finetune_steps, finetune_rule, recipe, calib_data)
    folder = resolve_model(str(model))
    check_seq_len(read_config(folder, trust_remote_code), seq_len)
    if calib_stats is None:  # enough calibration text? (tokenising a prefix; `calibrate` warns when short of what was asked)
        calibration_windows(load_tokenizer_from(folder, trust_remote_code), calib_data, calib_samples, seq_len, seed, warn=False)
    dtype = parse_dtype(dtype) if dtype is None or isinstance(dtype, str) else dtype
    if layer_by_layer:
        return _convert_layer_by_layer(model, folder, out, chosen, options, recipe, calib_data, calib_samples, seq_len,
                                       calib_stats, dtype, seed, overwrite, trust_remote_code, finetune, device_map, progress)

    from . import load_ann  # looked up at call time: tests replace it to prove nothing loads before the checks
    from .convert import convert

    ann, tokenizer = load_ann(str(folder), dtype, trust_remote_code, device_map)
    if finetune:
        check_enough_text(tokenizer, finetune_texts, seq_len, "fine-tuning data", "--finetune-data")
    main_process = _init_distributed()  # under torchrun: calibrate on every process, export from the first
    resume, checkpoints = resume_files(out)
    statistics, info, resumed = _calibration(ann, tokenizer, chosen, folder, resume, calib_data, calib_samples, seq_len,
                                             calib_stats, seed, main_process, progress)
    if not main_process:
        return None
    figures = None
    with _kept_on_interrupt(resume, checkpoints):
        snn = convert(ann, tokenizer, recipe=recipe, statistics=statistics, calibration_info=info,
                      calib_stats=calib_stats, seed=seed, progress=progress, **options)
        if finetune:
            rule, steps = finetune_rule or FINETUNE_RULE, finetune_steps or FINETUNE_STEPS
            figures = _finetune(snn, tokenizer, finetune_texts, checkpoints, progress, rule=rule, steps=steps, seed=seed,
                                seq_len=seq_len)
            snn.ann2snn["finetune"]["data"] = str(finetune_data or calib_data or "bundled")
        save(snn, out, tokenizer, overwrite=overwrite)
    resume.unlink(missing_ok=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    if figures is not None and figures.get("resumed_from_step"):
        resumed.append("finetune")
    return _summary(model, out, snn.ann2snn, chosen.outliers, resumed, figures)


def finetune_export(export: str | Path, data: str | Path, out: str | Path, *, rule: str = "distill", steps: int = 200,
                    lr: float | None = None, seed: int = 0, batch_size: int = 4, seq_len: int = 128,
                    train_weights: bool = True, checkpoint_every: int = 50, holdout=None, mix: float = 0.0,
                    guard=None, force: bool = False, overwrite: bool = False, device_map: str | None = "cpu", progress: bool = True,
                    **rule_options) -> dict:
    """Fine-tune the SNN in `export` on the text in `data` and export it to `out` (`ann2snn finetune`).

    Settings as `ann2snn.finetune.finetune` (`holdout`: a file or a share of `data` that decides whether the
    fine-tune is kept; `mix`: the share of bundled prose among the training windows; `guard`: text of another kind that
    vetoes a fine-tune making it worse (None: the bundled probe text; False: none); `force`: fine-tune even when the conversion is within that text's noise). The checkpoint is kept in `.OUT.finetune/` beside `out` until
    the export is written: a rerun with the same arguments resumes from it. Returns the figures, with "out".
    """
    out = Path(out)
    check_output(out, overwrite)
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be positive, got {lr}")
    check_rule_options(rule, rule_options)
    device_map = check_device_map(device_map)
    texts = read_texts(data, "fine-tuning data")
    model = load(export, device_map=device_map)
    check_seq_len(model.config, seq_len)
    tokenizer = load_tokenizer_from(Path(export))
    check_enough_text(tokenizer, texts, seq_len, "fine-tuning data", "--data")
    calibration = Path(export) / CALIBRATION_FILE
    if calibration.is_file():  # carried over, so the new export can feed --calib-stats too
        model.ann2snn["statistics"], _ = load_statistics(calibration)
    _, checkpoints = resume_files(out)
    with _kept_on_interrupt(checkpoints):
        figures = _finetune(model, tokenizer, texts, checkpoints, progress, rule=rule, steps=steps, lr=lr, seed=seed,
                            batch_size=batch_size, seq_len=seq_len, train_weights=train_weights,
                            checkpoint_every=checkpoint_every, holdout=holdout, mix=mix, guard=guard, force=force,
                            **rule_options)
        save(model, out, tokenizer, overwrite=overwrite)
    shutil.rmtree(checkpoints, ignore_errors=True)
    figures["out"] = str(out)
    return figures


def generate_text(export: str | Path, prompt: str, *, max_new_tokens: int = 40, simulation: str = "fast",
                  device_map: str | None = "cpu") -> str:
    """The prompt and its greedy continuation by the SNN in `export` (with key/value cache)."""
    from .modules.neuron import set_simulation

    if not prompt:
        raise ConfigError("--prompt is empty; give the text to continue")
    device_map = check_device_map(device_map)
    model = load(export, device_map=device_map)
    tokenizer = load_tokenizer_from(Path(export))
    set_simulation(model, simulation)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def evaluate_export(export: str | Path, data: str | Path, *, seq_len: int = 128, max_tokens: int = 20000,
                    simulation: str = "fast", device_map: str | None = "cpu", progress: bool = True) -> dict:
    """Perplexity of the export's ANN and SNN on `data` and their top-1 agreement (`ann2snn.evaluate.compare`),
    with the export's timesteps, coding and recipe."""
    from .evaluate import compare

    device_map = check_device_map(device_map)
    texts = read_texts(data, "evaluation data")
    model = load(export, device_map=device_map)
    check_seq_len(model.config, seq_len)
    tokenizer = load_tokenizer_from(Path(export))
    windows = token_windows(tokenizer, texts, seq_len, max_tokens=max_tokens)
    result = compare(model, windows, simulation, progress=progress)
    recipe = model.ann2snn["recipe"]
    result.update(timesteps=recipe["timesteps"], coding=recipe["coding"], recipe=recipe["name"])
    return result


def resume_files(out: Path) -> tuple[Path, Path]:
    """Where a run keeps what it resumes from, beside `out`: the calibration statistics and the fine-tune's checkpoints."""
    return out.parent / f".{out.name}.calibration.safetensors", out.parent / f".{out.name}.finetune"


def calibration_fingerprint(folder: Path, calib_data, samples: int, seq_len: int, seed: int, outliers) -> str:
    """What calibration depends on, so a rerun reuses kept statistics only for the same inputs."""
    parts = [str(Path(folder).resolve()), (Path(folder) / "config.json").read_bytes().hex()[:4096], str(samples),
             str(seq_len), str(seed), ",".join(outliers)]
    if calib_data is not None:
        data = Path(calib_data)
        parts += [str(data.resolve()), str(data.stat().st_size), str(data.stat().st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_finetune_options(finetune, finetune_data, finetune_steps, finetune_rule, recipe, calib_data) -> list[str] | None:
    """The fine-tuning text (None without `finetune`), once the fine-tune's options are checked."""
    given = [name for name, value in (("--finetune-data", finetune_data), ("--finetune-steps", finetune_steps),
                                      ("--finetune-rule", finetune_rule)) if value is not None]
    if given and not finetune:
        raise ConfigError(f"{', '.join(given)} only apply with --finetune; add --finetune or drop them")
    if not finetune:
        return None
    if recipe == "braintransformers":
        raise ConfigError("--finetune needs the qwen2 recipe (the braintransformers baseline has no calibrated thresholds)")
    if finetune_rule is not None and finetune_rule not in RULES:
        raise ConfigError(f"unknown fine-tuning rule {finetune_rule!r}; choose one of {', '.join(RULES)}")
    if finetune_steps is not None and (isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int)
                                       or finetune_steps <= 0):
        raise ConfigError(f"--finetune-steps must be a positive integer, got {finetune_steps!r}")
    return read_texts(finetune_data if finetune_data is not None else calib_data, "fine-tuning data")


def _calibration(ann, tokenizer, recipe, folder, resume: Path, calib_data, calib_samples, seq_len, calib_stats, seed,
                 main_process: bool, progress: bool) -> tuple[dict | None, dict | None, list[str]]:
    """(statistics, calibration summary, ["calibration"] if resumed): None, None with `calib_stats` (`convert` reads
    those); the statistics kept in `resume` by an earlier run with the same inputs; or a new calibration, kept in
    `resume` until the export is written."""
    from .convert import calibrate

    if calib_stats is not None:
        return None, None, []
    fingerprint = calibration_fingerprint(folder, calib_data, calib_samples, seq_len, seed, recipe.outliers)
    if resume.is_file():
        try:
            saved, info = load_statistics(resume)
        except CheckpointError:  # a damaged leftover: calibrate again, and replace it
            saved, info = None, {}
        if info.get("fingerprint") == fingerprint:
            _note(f"resuming from the calibration statistics saved in {resume}")
            return saved, info, ["calibration"]
    statistics, info = calibrate(ann, tokenizer, recipe, calib_data, calib_samples, seq_len, seed, progress=progress)
    info["fingerprint"] = fingerprint
    if main_process:
        _keep_statistics(statistics, info, resume)
    return statistics, info, []


def _keep_statistics(statistics: dict, info: dict, resume: Path) -> None:
    partial = resume.with_name(resume.name + ".partial")
    try:
        resume.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(statistics, partial, info)
        partial.replace(resume)
    except Exception as exc:
        cause = as_os_error(exc)
        if cause is None:
            raise
        raise CheckpointError(write_failure(resume, cause)) from None
    finally:
        partial.unlink(missing_ok=True)


def _finetune(snn, tokenizer, texts, checkpoints: Path, progress: bool, **settings) -> dict:
    """`ann2snn.finetune` with its checkpoints in `checkpoints`, resuming from the one there (same settings)."""
    from .finetune import HoldoutWarning, finetune

    if (checkpoints / CHECKPOINT_FILE).is_file():
        _note(f"resuming the fine-tune from the checkpoint in {checkpoints}")
    with warnings.catch_warnings():  # a small holdout is named in the figures' "warnings", printed by the CLI
        warnings.simplefilter("ignore", HoldoutWarning)
        return finetune(snn, tokenizer, texts, checkpoint_dir=checkpoints, resume=True, progress=progress, **settings)


@contextmanager
def _kept_on_interrupt(*paths: Path):
    """Turn Ctrl-C / SIGTERM into `Interrupted` naming those of `paths` that exist (a rerun resumes from them)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        kept = [path for path in paths if path.exists()]
        if kept and not isinstance(exc, Interrupted):
            raise Interrupted(kept) from None
        raise


def _summary(model, out: Path, meta: dict, outliers_asked, resumed: list[str], figures: dict | None) -> dict:
    return {"model": str(model), "out": str(out), "recipe": meta["recipe"], "range_steps": meta["range_steps"],
            "site_timesteps": meta["site_timesteps"], "allocation": meta["allocation"], "head": meta.get("head"),
            "outliers_asked": list(outliers_asked),
            "calibration": {k: v for k, v in meta["calibration"].items() if k != "fingerprint" and k not in TOKEN_WINDOWS},
            "resumed": resumed, "finetune": figures}


def _convert_layer_by_layer(model, folder, out, chosen, options, recipe, calib_data, calib_samples, seq_len, calib_stats,
                            dtype, seed, overwrite, trust_remote_code, finetune, device_map, progress) -> dict:
    from .layerwise import convert_layer_by_layer

    refused = [flag for flag, given in (("--finetune", finetune), ("--device-map", device_map not in (None, "cpu")),
                                        ("torchrun", _world_size() > 1)) if given]
    if refused:
        raise ConfigError(f"--layer-by-layer does not combine with {', '.join(refused)}; drop one of them")
    meta = convert_layer_by_layer(folder, out, recipe=recipe, calib_data=calib_data, calib_samples=calib_samples,
                                  seq_len=seq_len, calib_stats=calib_stats, seed=seed, dtype=dtype, overwrite=overwrite,
                                  trust_remote_code=trust_remote_code, progress=progress, **options)
    return _summary(model, out, meta, chosen.outliers, [], None)


def _world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> bool:
    """Join the torchrun process group when there is one; True on the process that writes output."""
    import torch.distributed as dist

    if _world_size() <= 1:
        return True
    if not dist.is_initialized():
        # the statistics are merged as CPU tensors: gloo carries those, NCCL (when there are GPUs) the rest
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank() == 0


def _process_device(device_map: str | None) -> str | None:
    """Under torchrun, 'cuda' and 'auto' mean this process's own GPU: the processes split the text, not the model."""
    if _world_size() > 1 and device_map in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device_map
