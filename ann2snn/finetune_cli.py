"""`ann2snn finetune`: plasticity fine-tuning of an export, written as a new export.

Registered on the `ann2snn` group at the end of `ann2snn/cli.py`.
"""

from __future__ import annotations

import json

import click

from .cli_support import FINETUNE_RULES, clean_errors, device_map_option, positive, print_notes


@click.command()
@click.argument("export_dir", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Text to fine-tune on (.txt, .jsonl or folder of .txt).")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Export folder for the result (must not exist unless --overwrite).")
@click.option("--rule", type=click.Choice(FINETUNE_RULES), default="distill", show_default=True,
              help="distill: gradient (STE) on weights and thresholds towards the ANN; stdp: reward-modulated STDP on weights.")
@click.option("--steps", type=int, default=200, show_default=True, callback=positive, help="Training batches.")
@click.option("--lr", type=float, default=None, help="distill: Adam rate on log-thresholds at T=4 (default 3e-2, cosine schedule; above T=4 every rate follows the code's level spacing unless --option rates_follow_levels=false); stdp: rate η (default 4).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, callback=positive, help="Windows per batch.")
@click.option("--seq-len", type=int, default=128, show_default=True, callback=positive, help="Tokens per window.")
@click.option("--train-weights/--thresholds-only", default=True, show_default=True,
              help="train the Synapsis weights as well as the thresholds, or the thresholds only (both rules).")
@click.option("--checkpoint-every", type=int, default=50, show_default=True, callback=positive,
              help="Steps between checkpoints (kept beside --out until the export is written).")
@click.option("--resume", is_flag=True, hidden=True, help="No effect: a rerun with the same options always resumes.")
@click.option("--holdout", default=None, metavar="FILE|SHARE",
              help="Text that decides whether the fine-tune is kept (never trained on): a file, or a share of --data "
                   "(default: its last 10%, at least 4096 tokens).")
@click.option("--mix", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, metavar="SHARE",
              help="Share of the training windows, and of the holdout's, drawn from the bundled English text beside "
                   "--data's, for a fine-tune that holds on other kinds of text too (undone if it makes --data's own "
                   "holdout windows worse).")
@click.option("--guard", default=None, metavar="FILE|none",
              help="Text of another kind that only vetoes: a fine-tune that makes it worse beyond its noise is undone "
                   "(default: the bundled probe text of code, logs and a manual; none: no guard).")
@click.option("--force", is_flag=True, help="Fine-tune even when the conversion's gap on the holdout is within its noise.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out that is an ann2snn export or an empty folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A rule option, repeatable (stdp: teacher=network, clip_rate=0.1, a_minus=0.5, ...; "
                   "distill: schedule=constant, hidden=0, ...); see ann2snn/finetune/.")
@device_map_option
@clean_errors
def finetune(export_dir, data, out_dir, rule, steps, lr, seed, batch_size, seq_len, train_weights, checkpoint_every,
             resume, holdout, mix, guard, force, overwrite, as_json, options, device_map):
    """Fine-tune the SNN in EXPORT_DIR on --data and export it to --out.

    --holdout (default: the last windows of --data) is never trained on; the
    figures printed (ANN and SNN perplexity, before and after) are measured on
    it, and the fine-tune is kept only if it lowers the SNN's perplexity there
    by more than the noise, and does not make --guard (text of another kind)
    worse beyond its noise.

    The checkpoint is kept beside --out until the export is written: an
    interrupted run resumes from it when rerun with the same options.
    """
    from .pipeline import finetune_export

    figures = finetune_export(export_dir, data, out_dir, rule=rule, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                              seq_len=seq_len, train_weights=train_weights, checkpoint_every=checkpoint_every,
                              holdout=_parse_holdout(holdout), mix=mix, guard=_parse_guard(guard), force=force, overwrite=overwrite, device_map=device_map,
                              progress=not as_json, **_parse_options(options))
    print_notes(figures)
    if as_json:
        click.echo(json.dumps(figures, sort_keys=True))
        return
    from .finetune import gap_reduction

    changed = f"thresholds changed {figures['thresholds_changed']}/{figures['thresholds_total']}"
    if figures.get("mean_abs_dw"):
        changed += f", mean |Δw| {figures['mean_abs_dw']:.3g}"
    click.echo(f"{'not fine-tuned' if figures['skipped'] else 'fine-tuned'} ({rule}, {steps} steps) → {figures['out']}\n"
               f"held-out ({figures['held_out_tokens']} tokens): perplexity ANN {figures['ppl_ann']:.3f}  "
               f"SNN {figures['ppl_snn_before']:.3f} → {figures['ppl_snn_after']:.3f} "
               f"(gap closed {gap_reduction(figures):.1f}%)\n"
               f"KL(ANN‖SNN) {figures['kl_before']:.5f} → {figures['kl_after']:.5f}; {changed}"
               + (f"\nguard ({figures['guard']}): NLL fell {figures['guard_fall_nats']:+.4f} ± "
                  f"{figures['guard_fall_noise_nats']:.4f} nats per token, {figures['guard_fall_windows_better'][0]} of "
                  f"{figures['guard_fall_windows_better'][1]} windows better"
                  if figures.get("guard_fall_nats") is not None else "")
               + (f"\nthe fine-tune was undone: {figures['undone_because']}" if figures["reverted"] else ""))


def _parse_holdout(value):
    """--holdout: a share (a number) or a file (read now, so a bad one is refused before loading the model)."""
    from .calibration.data import read_texts
    from .errors import ConfigError

    if value is None:
        return None
    try:
        share = float(value)
    except ValueError:
        read_texts(value, "holdout")
        return value
    if not 0 < share < 1:
        raise ConfigError(f"--holdout {value} is neither a share between 0 and 1 nor a file; pass e.g. 0.1 or text.txt")
    return share


def _parse_guard(value):
    """--guard: a file (read now, so a bad one is refused before loading the model), none (False) or the default (None)."""
    from .calibration.data import read_texts

    if value is None:
        return None
    if value.lower() == "none":
        return False
    read_texts(value, "guard")
    return value


def _parse_options(pairs) -> dict:
    """KEY=VALUE pairs; a VALUE that reads as JSON (0.5, 8, true, null) is that, else it is a string."""
    from .errors import ConfigError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE (e.g. --option teacher=network)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
