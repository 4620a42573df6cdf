"""`ann2snn report`: spikes, synaptic operations, fidelity and an energy estimate of an export, as JSON, Markdown and plots."""

from __future__ import annotations

import click

from .cli_support import clean_errors, device_map_option, positive


def _timesteps(ctx, param, value):
    if value is None:
        return None
    values = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            t = int(part)
        except ValueError:
            raise click.BadParameter(f"must be comma-separated positive integers such as 4,8,16, got {value!r}") from None
        if t <= 0:
            raise click.BadParameter(f"must be positive integers, got {t}")
        values.append(t)
    if not values:
        raise click.BadParameter("give at least one time step count, e.g. 4,8,16")
    return list(dict.fromkeys(values))


def _energy(ctx, param, value):
    import math

    if value is not None and (not math.isfinite(value) or value < 0):
        raise click.BadParameter(f"must be a finite non-negative energy in pJ, got {value}")
    return value


@click.command("report")
@click.argument("export_dir", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Text to run (.txt, .jsonl or folder).")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Report folder to create (must not exist).")
@click.option("--timesteps", "-T", callback=_timesteps, default=None,
              help="Comma-separated T values, e.g. 4,8,16; other T than the export's are rebuilt from its calibration "
                   "statistics (default: the export's T).")
@click.option("--max-tokens", type=int, default=2048, show_default=True, callback=positive, help="Run at most this many tokens.")
@click.option("--seq-len", type=int, default=128, show_default=True, callback=positive, help="Tokens per window.")
@click.option("--batch-size", type=int, default=4, show_default=True, callback=positive, help="Windows per forward pass.")
@click.option("--e-mac", type=float, default=4.6, show_default=True, callback=_energy, help="Energy of a MAC in pJ (45 nm).")
@click.option("--e-ac", type=float, default=0.9, show_default=True, callback=_energy, help="Energy of an AC in pJ (45 nm).")
@click.option("--e-shift", type=float, default=None, callback=_energy, help="Energy of a shift in pJ (default: --e-ac).")
@device_map_option
@clean_errors
def report(export_dir, data, out_dir, timesteps, max_tokens, seq_len, batch_size, e_mac, e_ac, e_shift, device_map):
    """Run the export as ANN and as SNN (step simulation) over --data and write report.json, report.md and plots.

    Counts every neuron's spikes, the synaptic operations they drive (ACs, and a
    shift per AC for weighted phase-code spikes), the ANN's MACs for the same
    layers and the float operations both keep; estimates energy (45 nm
    convention by default) and compares ANN and SNN hidden states layer by layer.
    """
    from pathlib import Path

    from . import load, load_tokenizer
    from .calibration.data import read_texts, token_windows
    from .errors import ConfigError
    from .placement import check_device_map
    from .report import EnergyModel, build_reports, check_timesteps, write_report

    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"report folder {out} already exists; choose another --out")
    energy = EnergyModel(e_mac_pj=e_mac, e_ac_pj=e_ac, e_shift_pj=e_shift)
    device_map = check_device_map(device_map)
    texts = read_texts(data)
    model = load(export_dir, device_map=device_map)
    if timesteps:
        check_timesteps(export_dir, timesteps)
    tokenizer = load_tokenizer(export_dir)
    windows = token_windows(tokenizer, texts, seq_len, max_tokens=max_tokens)
    result = build_reports(export_dir, windows, timesteps, energy=energy, batch_size=batch_size, model=model,
                           device_map=device_map)
    folder, plots = write_report(result, out)
    primary = next(r for r in result["runs"] if r["timesteps"] == result["primary_timesteps"])
    if not plots:
        click.echo("note: matplotlib is not installed, so no plots were drawn (pip install 'ann2snn[report]')", err=True)
    click.echo(f"report → {folder} ({len(result['runs'])} run(s), {result['tokens_processed']} tokens): at T={primary['timesteps']} "
               f"PPL ANN {primary['ppl_ann']:.3f} SNN {primary['ppl_snn']:.3f}, top-1 agreement {primary['top1_agreement']:.4f}, "
               f"firing rate {primary['totals']['firing_rate']:.4f}, energy SNN/ANN {primary['energy']['snn_over_ann']:.3f}")
