"""`ann2snn report`: spikes, synaptic operations, fidelity and energy (three views) of an export, as JSON, Markdown and plots."""

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
@click.option("--data", type=click.Path(), required=True, help="Text to run (.txt, .jsonl or folder); named in the report.")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Report folder to create (absent or empty).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a report folder (anything else is refused).")
@click.option("--timesteps", "-T", callback=_timesteps, default=None,
              help="Comma-separated T values, e.g. 4,8,16; other T than the export's are rebuilt from its calibration "
                   "statistics (default: the export's T; refused for a fine-tuned export).")
@click.option("--max-tokens", type=int, default=2048, show_default=True, callback=positive, help="Run at most this many tokens.")
@click.option("--seq-len", type=int, default=128, show_default=True, callback=positive, help="Tokens per window.")
@click.option("--batch-size", type=int, default=4, show_default=True, callback=positive, help="Windows per forward pass.")
@click.option("--e-mac", type=float, default=4.6, show_default=True, callback=_energy, help="(i) fp32 MAC in pJ (45 nm).")
@click.option("--e-ac", type=float, default=0.9, show_default=True, callback=_energy, help="(i) fp32 add (AC) in pJ (45 nm).")
@click.option("--e-shift", type=float, default=None, callback=_energy, help="(i) Shift in pJ (default: --e-ac).")
@click.option("--e-neuron", type=float, default=None, callback=_energy,
              help="(i) Neuron update (compare and subtract) in pJ (default: 2 × --e-ac).")
@click.option("--weight-bits", type=int, default=16, show_default=True, callback=positive,
              help="(ii) Integer weight width of both models.")
@click.option("--accumulator-bits", type=int, default=32, show_default=True, callback=positive,
              help="(ii) Integer accumulator width of both models.")
@click.option("--e-int-add", type=float, default=0.1, show_default=True, callback=_energy,
              help="(ii) 32-bit integer add in pJ (45 nm); an n-bit add costs n/32 of it.")
@click.option("--e-int-mult", type=float, default=0.2, show_default=True, callback=_energy,
              help="(ii) 8×8-bit integer multiply in pJ (45 nm); a b×w-bit one costs b·w/64 of it.")
@click.option("--e-sram", type=float, default=1.25, show_default=True, callback=_energy,
              help="(iii) SRAM access in pJ per byte (5 pJ per 32-bit word).")
@click.option("--e-dram", type=float, default=160.0, show_default=True, callback=_energy,
              help="(iii) DRAM access in pJ per byte (640 pJ per 32-bit word).")
@device_map_option
@clean_errors
def report(export_dir, data, out_dir, overwrite, timesteps, max_tokens, seq_len, batch_size, e_mac, e_ac, e_shift,
           e_neuron, weight_bits, accumulator_bits, e_int_add, e_int_mult, e_sram, e_dram, device_map):
    """Run the export as ANN and as SNN (step simulation) over --data and write report.json, report.md and plots.

    Counts every neuron's spikes and updates, the synaptic operations they drive
    (ACs, and a shift per output accumulator per weighted phase-code step), the
    ANN's MACs for the same layers (attention: the causal half, in both) and the
    float operations both keep; estimates energy three ways: (i) 45 nm fp32
    operations, (ii) against an integer ANN of the same levels, (iii) with memory
    traffic; and compares ANN and SNN hidden states layer by layer.
    """
    from . import load, load_tokenizer
    from .calibration.data import read_texts, token_windows
    from .placement import check_device_map
    from .rebuild import check_timesteps
    from .report import EnergyModel, IntegerModel, MemoryModel, build_reports, check_out, write_report

    out = check_out(out_dir, overwrite)
    energy = EnergyModel(e_mac_pj=e_mac, e_ac_pj=e_ac, e_shift_pj=e_shift, e_neuron_pj=e_neuron)
    integer = IntegerModel(weight_bits=weight_bits, accumulator_bits=accumulator_bits, e_int32_add_pj=e_int_add,
                           e_int8_mult_pj=e_int_mult)
    memory = MemoryModel(e_sram_pj_per_byte=e_sram, e_dram_pj_per_byte=e_dram)
    device_map = check_device_map(device_map)
    texts = read_texts(data, "report data")
    model = load(export_dir, device_map=device_map)
    if timesteps:
        check_timesteps(export_dir, timesteps)
    tokenizer = load_tokenizer(export_dir)
    windows = token_windows(tokenizer, texts, seq_len, max_tokens=max_tokens)
    result = build_reports(export_dir, windows, timesteps, energy=energy, integer=integer, memory=memory,
                           batch_size=batch_size, model=model, device_map=device_map, data=data)
    folder, plots = write_report(result, out, overwrite=overwrite)
    primary = next(r for r in result["runs"] if r["timesteps"] == result["primary_timesteps"])
    if not plots:
        click.echo("note: matplotlib is not installed, so no plots were drawn (pip install 'ann2snn[report]')", err=True)
    click.echo(f"report → {folder} ({len(result['runs'])} run(s), {result['tokens_processed']} tokens of {data}): at "
               f"T={primary['timesteps']} PPL ANN {primary['ppl_ann']:.3f} SNN {primary['ppl_snn']:.3f}, top-1 agreement "
               f"{primary['top1_agreement']:.4f}, firing rate {primary['totals']['firing_rate']:.4f}; energy SNN/ANN "
               f"(i) {primary['energy']['snn_over_ann']:.3f}, (ii) vs integer ANN "
               f"{primary['energy_integer']['snn_over_ann']:.3f}, (iii) with memory "
               f"{primary['memory']['stationary']['snn_over_ann']:.3f} (weights on chip) / "
               f"{primary['memory']['streamed']['snn_over_ann']:.3f} (streamed)")
