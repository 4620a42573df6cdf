"""The `ann2snn` command line: convert, generate, eval (finetune and report are registered at the end).

Each command parses its options, makes one call to `ann2snn.pipeline` and prints what it returns. Every
user error is an `Ann2SnnError`: printed as one line on stderr with exit status 2, and nothing
half-written left on disk. Nothing heavy is imported before a command runs, so `--help` and `--version`
are quick and an early Ctrl-C ends in one line.
"""

from __future__ import annotations

import json

import click

from .cli_support import FINETUNE_RULES, clean_errors, device_map_option, positive, print_notes


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
@click.option("--head-steps", default=None,
              help="Time steps of the spiking lm_head's input neuron beyond --timesteps: auto (recipe default: as many "
                   "as its measured effect on the calibration windows asks, up to 3) or a number from 0 to 3.")
@click.option("--levels", type=click.Choice(["auto", "uniform"]), default=None,
              help="Time steps per site: auto (recipe default: each site the fewest of 2..its T that keep the budget, "
                   "measured on the calibration windows and a bundled probe text of code and logs) or uniform (every site T, the head its own).")
@click.option("--max-ppl-ratio", type=float, default=None,
              help="Per-site levels (implies --levels auto): what the PPL ratio SNN/ANN may gain on text unlike the calibration text (default 1.01; kept on the calibration and probe windows as added KL, with a margin).")
@click.option("--energy-budget", type=float, default=None,
              help="Per-site levels (implies --levels auto), instead of --max-ppl-ratio: the SNN/ANN energy (report view i) to reach.")
@click.option("--outliers", default=None, callback=lambda c, p, v: None if v is None else tuple(x for x in v.split(",") if x and x != "none"),
              help="Outlier handling: none (recipe default), any of rotate,smooth,sink, or auto (sink where the model has one).")
@click.option("--recipe", default="qwen2", show_default=True, help="Conversion recipe: qwen2 or braintransformers (baseline).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out that is an ann2snn export or an empty folder.")
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
            head_steps, levels, max_ppl_ratio, energy_budget, outliers, recipe, dtype, seed, overwrite, trust_remote_code, finetune, finetune_data, finetune_steps, finetune_rule, layer_by_layer,
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
    from .pipeline import convert_and_export

    summary = convert_and_export(
        model, out_dir, recipe=recipe, timesteps=timesteps, coding=coding, threshold=threshold, headroom=headroom,
        outliers=outliers, range_steps=range_steps, head_steps=head_steps, levels=levels, max_ppl_ratio=max_ppl_ratio,
        energy_budget=energy_budget, calib_data=calib_data, calib_samples=calib_samples, seq_len=seq_len,
        calib_stats=calib_stats, dtype=dtype, seed=seed, overwrite=overwrite, trust_remote_code=trust_remote_code,
        finetune=finetune, finetune_data=finetune_data, finetune_steps=finetune_steps, finetune_rule=finetune_rule,
        layer_by_layer=layer_by_layer, device_map=device_map)
    if summary is None:  # a torchrun process other than the first: the first one writes and reports
        return
    recipe, sites = summary["recipe"], summary["range_steps"]
    ranged = f"{len(sites)} sites with up to {max(sites.values())} range steps (longer windows)" if sites else "none"
    outliers = ",".join(recipe["outliers"]) or "none"
    if summary["outliers_asked"] == ["auto"]:  # say what auto decided, and why
        calibration = summary["calibration"]
        outliers = f"auto → {outliers}" + (f" (sink {calibration['sink']}, first-token ratio {calibration['first_token_ratio']})"
                                          if "sink" in calibration else "")
    click.echo(f"converted {model} → {summary['out']} (recipe {recipe['name']}, {recipe['coding']} coding, "
               f"T={recipe['timesteps']}, {recipe['levels']} levels, thresholds: {recipe['threshold']} "
               f"×{recipe['headroom']:g}, range steps: {ranged}, levels: {_levels(summary)}{_head(summary)}, "
               f"outliers: {outliers})")
    figures = summary["finetune"]
    if figures is not None:
        from .finetune import gap_reduction

        click.echo(f"{'not fine-tuned' if figures['skipped'] else 'fine-tuned'} ({figures['rule']}, {figures['steps']} steps): held-out perplexity ANN "
                   f"{figures['ppl_ann']:.3f}  SNN {figures['ppl_snn_before']:.3f} → {figures['ppl_snn_after']:.3f} "
                   f"(gap closed {gap_reduction(figures):.1f}%)"
                   + (f"; undone: {figures['undone_because']}" if figures["reverted"] else ""))
        print_notes(figures)


def _head(summary: dict) -> str:
    """The spiking head's window, where it has one of its own ("" for a float head)."""
    head = summary.get("head") or {}
    return "".join(f", {site} at T={found['timesteps']} ({found['rule']})" for site, found in head.items())


def _levels(summary: dict) -> str:
    """The per-site levels in a few words: how many sites went below T, and what the allocation measured."""
    found, recipe = summary["allocation"], summary["recipe"]
    if not found:
        return "uniform"
    budget = (f"for a PPL ratio ≤ {found['max_ppl_ratio']:g} on unlike text, KL added per token " + ", ".join(
              f"on the {name} windows {text['added_kl']:.4f} nats (≤ {text['allowed_kl']:.4f}, PPL ratio "
              f"{text['measured_ppl_ratio']:.4f} there)" for name, text in (("calibration", found), ("probe", found.get("probe")))
              if text) if "max_ppl_ratio" in found else
              f"predicted energy {found['predicted_snn_over_ann']:.3f} (≤ {found['energy_budget']:g}), PPL ratio "
              f"{found['measured_ppl_ratio']:.4f} on the calibration windows")
    below = [t for t in summary["site_timesteps"].values() if t < recipe["timesteps"]]
    return (f"auto ({len(below)} of {found['sites']} sites below T={recipe['timesteps']}, "
            f"mean T {found['mean_timesteps']:.2f}; {budget})")


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
    from .pipeline import generate_text

    click.echo(generate_text(export_dir, prompt, max_new_tokens=max_new_tokens, simulation=simulation, device_map=device_map))


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
    from .pipeline import evaluate_export

    result = evaluate_export(export_dir, data, seq_len=seq_len, max_tokens=max_tokens, simulation=simulation,
                             device_map=device_map, progress=not as_json)
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
