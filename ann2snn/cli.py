"""The `ann2snn` command line: convert, generate, eval.

Every user error is an `Ann2SnnError`: printed as one line on stderr with exit
status 2, and nothing half-written left on disk.
"""

from __future__ import annotations

import json

import click

from .cli_support import clean_errors, device_map_option, positive
from .finetune.core import RULES as FINETUNE_RULES


def _calibration_fingerprint(folder, calib_data, samples, seq_len, seed, transforms) -> str:
    """What calibration depends on, so a resumed convert reuses statistics only for the same inputs."""
    import hashlib
    from pathlib import Path

    parts = [str(Path(folder).resolve()), (Path(folder) / "config.json").read_bytes().hex()[:4096], str(samples), str(seq_len), str(seed), ",".join(transforms)]
    if calib_data is not None:
        data = Path(calib_data)
        parts += [str(data.resolve()), str(data.stat().st_size), str(data.stat().st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> bool:
    """Join the torchrun process group when there is one; True on the process that writes output."""
    import torch
    import torch.distributed as dist

    if _world_size() <= 1:
        return True
    if not dist.is_initialized():
        # the statistics are merged as CPU tensors: gloo carries those, NCCL (when there are GPUs) the rest
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank() == 0


def _process_device(device_map: str) -> str:
    """Under torchrun, 'cuda' and 'auto' mean this process's own GPU: the processes split the text, not the model."""
    import os

    import torch

    if _world_size() > 1 and device_map in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device_map


@click.group()
@click.version_option(package_name="ann2snn")
def main():
    """Convert Qwen-style language models into spiking neural networks."""


@main.command()
@click.argument("model")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Export folder (must not exist unless --overwrite).")
@click.option("--calib-data", type=click.Path(), default=None, help=".txt, .jsonl (text field) or folder of .txt; default: bundled English text.")
@click.option("--calib-samples", type=int, default=32, show_default=True, callback=positive, help="Token windows used for calibration.")
@click.option("--seq-len", type=int, default=128, show_default=True, callback=positive, help="Tokens per calibration window.")
@click.option("--calib-stats", type=click.Path(), default=None, help="Reuse calibration.safetensors from an earlier convert.")
@click.option("--timesteps", "-T", type=int, default=None, callback=positive, help="Time steps per spike window (recipe default: 8).")
@click.option("--coding", type=click.Choice(["rate", "phase"]), default=None, help="Spike coding (recipe default: phase).")
@click.option("--threshold", type=click.Choice(["max", "percentile", "mse"]), default=None,
              help="Threshold rule (recipe default by levels: mse below phase T=8, max from there).")
@click.option("--headroom", type=float, default=None,
              help="Clip = headroom × the rule's clip, a margin for values calibration missed (recipe default by levels: 1, 2, 4).")
@click.option("--range-steps", default=None,
              help="High-order phase steps that extend a site's range past its clip: auto (recipe default: at "
                   "heavy-tailed sites, from calibration) or a number for every site; 0 = none.")
@click.option("--outliers", default=None, callback=lambda c, p, v: None if v is None else tuple(x for x in v.split(",") if x and x != "none"),
              help="Outlier handling: none (recipe default), any of rotate,smooth,sink, or auto (sink where the model has one).")
@click.option("--recipe", default="qwen2", show_default=True, help="Conversion recipe: qwen2 or braintransformers (baseline).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped with the checkpoint to run (off by default).")
@click.option("--finetune", "finetune", is_flag=True, help="Fine-tune the SNN after conversion, before export (see `ann2snn finetune`).")
@click.option("--finetune-data", type=click.Path(), default=None, help="Text to fine-tune on (default: the calibration text).")
@click.option("--finetune-steps", type=int, default=None, callback=positive, help="Fine-tuning batches (default 200).")
@click.option("--finetune-rule", type=click.Choice(FINETUNE_RULES), default=None, help="distill (default) or stdp.")
@click.option("--layer-by-layer", is_flag=True,
              help="Hold one decoder layer in memory at a time (checkpoints larger than memory); no --outliers.")
@device_map_option
@clean_errors
def convert(model, out_dir, calib_data, calib_samples, seq_len, calib_stats, timesteps, coding, threshold, headroom, range_steps,
            outliers, recipe, dtype, seed, overwrite, trust_remote_code, finetune, finetune_data, finetune_steps, finetune_rule, layer_by_layer,
            device_map):
    """Calibrate MODEL on text, convert it to an SNN and export it to --out.

    MODEL is a local checkpoint folder, a hub id (Qwen/Qwen2.5-3B), a short name
    (Qwen2.5-3B) or the embedded 'qwen2-tiny'.

    With --finetune the SNN is fine-tuned (`ann2snn finetune`'s rule, on
    --finetune-data, windows of --seq-len tokens, --seed) between conversion and
    export; its checkpoint is kept beside --out until the export is written, so
    an interrupted run resumes there when rerun with the same options.

    Under torchrun each process calibrates on its share of the text; with
    --device-map cuda or auto, each on its own GPU (LOCAL_RANK).

    --layer-by-layer reads, calibrates, converts and writes one decoder layer
    at a time (the same export; see ann2snn/layerwise.py).
    """
    import shutil
    from pathlib import Path

    from . import convert as convert_model, load_ann, save
    from .calibration.calibrate import load_statistics, save_statistics
    from .calibration.data import read_texts
    from .convert import calibrate
    from .errors import ConfigError
    from .models import parse_dtype, resolve_model
    from .placement import check_device_map
    from .recipes import get_recipe

    # Check what is cheap to check before loading anything.
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    options = dict(timesteps=timesteps, coding=coding, threshold=threshold, headroom=headroom, outliers=outliers,
                   range_steps=range_steps)
    get_recipe(recipe).with_options(**options)
    device_map = check_device_map(_process_device(device_map))
    if calib_stats is None:
        read_texts(calib_data)
    given = [name for name, value in (("--finetune-data", finetune_data), ("--finetune-steps", finetune_steps),
                                      ("--finetune-rule", finetune_rule)) if value is not None]
    if given and not finetune:
        raise ConfigError(f"{', '.join(given)} only apply with --finetune; add --finetune or drop them")
    if finetune:
        if recipe == "braintransformers":
            raise ConfigError("--finetune needs the qwen2 recipe (the braintransformers baseline has no calibrated thresholds)")
        finetune_texts = read_texts(finetune_data if finetune_data is not None else calib_data)
        finetune_rule = finetune_rule or "distill"
        finetune_steps = finetune_steps or 200
    folder = resolve_model(model)
    if layer_by_layer:
        _convert_layer_by_layer(model, folder, out, options, recipe, calib_data, calib_samples, seq_len, calib_stats,
                                dtype, seed, overwrite, trust_remote_code, finetune, device_map)
        return
    ann, tokenizer = load_ann(str(folder), parse_dtype(dtype), trust_remote_code, device_map)
    main_process = _init_distributed()  # under torchrun: calibrate on every process, export from the first

    statistics, info = None, None
    resume = out.parent / f".{out.name}.calibration.safetensors"  # survives an interrupted export
    transforms = get_recipe(recipe).with_options(**options).outliers
    fingerprint = _calibration_fingerprint(folder, calib_data, calib_samples, seq_len, seed, transforms)
    if calib_stats is None and resume.is_file():
        saved, info = load_statistics(resume)
        if info.get("fingerprint") == fingerprint:
            statistics = saved
            click.echo(f"resuming from the calibration statistics saved in {resume}", err=True)
    if calib_stats is None and statistics is None:
        statistics, info = calibrate(ann, tokenizer, get_recipe(recipe).with_options(**options), calib_data,
                                     calib_samples, seq_len, seed)
        info["fingerprint"] = fingerprint
        if not main_process:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = resume.with_name(resume.name + ".partial")
        try:
            save_statistics(statistics, partial, info)
            partial.replace(resume)
        finally:
            partial.unlink(missing_ok=True)
    snn = convert_model(ann, tokenizer, recipe=recipe, statistics=statistics, calibration_info=info,
                        calib_stats=calib_stats, seed=seed, **options)
    checkpoints = out.parent / f".{out.name}.finetune"
    if finetune:
        from .finetune import finetune as finetune_model, gap_reduction

        if (checkpoints / "finetune-checkpoint.pt").is_file():
            click.echo(f"resuming the fine-tune from the checkpoint in {checkpoints}", err=True)
        try:
            figures = finetune_model(snn, tokenizer, finetune_texts, rule=finetune_rule, steps=finetune_steps, seed=seed,
                                     seq_len=seq_len, checkpoint_dir=checkpoints, resume=True)
        except KeyboardInterrupt:
            if (checkpoints / "finetune-checkpoint.pt").is_file():
                click.echo(f"the checkpoint in {checkpoints} keeps the fine-tuning progress: rerun the same command to resume",
                           err=True)
            raise
        snn.ann2snn["finetune"]["data"] = str(finetune_data or calib_data or "bundled")
    save(snn, out, tokenizer, overwrite=overwrite)
    resume.unlink(missing_ok=True)
    if finetune:
        shutil.rmtree(checkpoints, ignore_errors=True)
    _report_conversion(model, out, snn.ann2snn)
    if finetune:
        click.echo(f"fine-tuned ({finetune_rule}, {finetune_steps} steps): held-out perplexity ANN {figures['ppl_ann']:.3f}  "
                   f"SNN {figures['ppl_snn_before']:.3f} → {figures['ppl_snn_after']:.3f} "
                   f"(gap closed {gap_reduction(figures):.1f}%)"
                   + ("; it made the held-out loss worse, so it was undone" if figures["reverted"] else ""))


def _report_conversion(model, out, meta) -> None:
    summary, ranged = meta["recipe"], meta["range_steps"]
    extra = f"{len(ranged)} sites with up to {max(ranged.values())} range steps (longer windows)" if ranged else "none"
    click.echo(f"converted {model} → {out} (recipe {summary['name']}, {summary['coding']} coding, T={summary['timesteps']}, "
               f"{summary['levels']} levels, thresholds: {summary['threshold']} ×{summary['headroom']:g}, "
               f"range steps: {extra}, outliers: {','.join(summary['outliers']) or 'none'})")


def _convert_layer_by_layer(model, folder, out, options, recipe, calib_data, calib_samples, seq_len, calib_stats, dtype,
                            seed, overwrite, trust_remote_code, finetune, device_map) -> None:
    from .errors import ConfigError
    from .layerwise import convert_layer_by_layer
    from .models import load_tokenizer_from, parse_dtype

    refused = [flag for flag, given in (("--finetune", finetune), ("--device-map", device_map not in (None, "cpu")),
                                        ("torchrun", _world_size() > 1)) if given]
    if refused:
        raise ConfigError(f"--layer-by-layer does not combine with {', '.join(refused)}; drop one of them")
    tokenizer = load_tokenizer_from(folder, trust_remote_code)
    meta = convert_layer_by_layer(folder, out, tokenizer, recipe=recipe, calib_data=calib_data, calib_samples=calib_samples,
                                  seq_len=seq_len, calib_stats=calib_stats, seed=seed, dtype=parse_dtype(dtype), overwrite=overwrite,
                                  trust_remote_code=trust_remote_code, **options)
    _report_conversion(model, out, meta)


@main.command()
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=40, show_default=True, callback=positive)
@click.option("--simulation", type=click.Choice(["fast", "step"]), default="fast", show_default=True,
              help="fast: exact accumulated spike counts; step: simulate every time step (same tokens, slower).")
@device_map_option
@clean_errors
def generate(export_dir, prompt, max_new_tokens, simulation, device_map):
    """Generate text with an exported SNN (greedy, with key/value cache)."""
    from . import load, load_tokenizer, set_simulation
    from .placement import check_device_map

    model = load(export_dir, device_map=check_device_map(device_map))
    tokenizer = load_tokenizer(export_dir)
    set_simulation(model, simulation)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    click.echo(tokenizer.decode(output[0], skip_special_tokens=True))


@main.command(name="eval")
@click.argument("export_dir", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Text to score (.txt, .jsonl or folder).")
@click.option("--seq-len", type=int, default=128, show_default=True, callback=positive)
@click.option("--max-tokens", type=int, default=20000, show_default=True, callback=positive, help="Score at most this many tokens.")
@click.option("--simulation", type=click.Choice(["fast", "step"]), default="fast", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@device_map_option
@clean_errors
def evaluate(export_dir, data, seq_len, max_tokens, simulation, as_json, device_map):
    """Perplexity of the ANN and the SNN on --data, and how often their top-1 tokens agree."""
    from . import load, load_tokenizer
    from .calibration.data import read_texts, token_windows
    from .evaluate import compare
    from .placement import check_device_map

    device_map = check_device_map(device_map)
    texts = read_texts(data)
    model = load(export_dir, device_map=device_map)
    tokenizer = load_tokenizer(export_dir)
    windows = token_windows(tokenizer, texts, seq_len, max_tokens=max_tokens)
    result = compare(model, windows, simulation, progress=not as_json)
    recipe = model.ann2snn["recipe"]
    result.update(timesteps=recipe["timesteps"], coding=recipe["coding"], recipe=recipe["name"])
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(f"tokens {result['tokens']}  T={result['timesteps']} ({result['coding']})\n"
                   f"perplexity  ANN {result['ppl_ann']:.3f}  SNN {result['ppl_snn']:.3f}  "
                   f"(ratio {result['ppl_snn'] / result['ppl_ann']:.4f})\n"
                   f"top-1 agreement {result['top1_agreement']:.4f}")


from .finetune_cli import finetune  # noqa: E402

main.add_command(finetune)


from .report_cli import report  # noqa: E402

main.add_command(report)


if __name__ == "__main__":
    main()
