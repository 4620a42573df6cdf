"""SNN/ANN energy in three views beside the perplexity ratio, at each T: a table and a Pareto plot.

    python benchmarks/energy.py MODEL [--timesteps 4,6,8] [--data FILE] [--max-tokens 512]
        [--seq-len 128] [--batch-size 4] [--calib-samples 16] [--png energy_pareto.png] [--markdown OUT.md]

MODEL is an export folder (`ann2snn convert --out`; other T than its own are
rebuilt from its calibration statistics, as `ann2snn report --timesteps`) or a
checkpoint / "qwen2-tiny" (calibrated once on the bundled text with
--calib-samples windows, then converted at each T with the recipe's defaults).
Each T runs the model as ANN and as SNN (step simulation) over the same windows
of --data (default: the bundled held-out text) with `ann2snn.report.build_report`,
so every figure is one that `ann2snn report` writes:

- PPL ratio: PPL(SNN) / PPL(ANN) on those windows;
- (i): the field's convention, 45 nm fp32 operations (E_MAC 4.6, E_AC 0.9 pJ),
  shifts per output accumulator per weighted step, neuron updates charged,
  causal attention in both; `runs[i].energy.snn_over_ann`;
- (ii): against an integer ANN with b = ⌈log2 levels⌉-bit activations, 16-bit
  weights and 32-bit accumulators; `runs[i].energy_integer`;
- (iii): (i) plus memory traffic, weights on chip (one SRAM read per MAC / AC)
  or streamed from DRAM (once per pass; the SNN's spiking layers once per step);
  `runs[i].memory`.

The Pareto plot puts every (PPL ratio, energy ratio) point of every view on one
chart: below 1 on the energy axis the SNN is cheaper, left is more faithful.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

VIEWS = (("(i) fp32 ops", lambda r: r["energy"]["snn_over_ann"]),
         ("(ii) vs integer ANN", lambda r: r["energy_integer"]["snn_over_ann"]),
         ("(iii) + memory, weights on chip", lambda r: r["memory"]["stationary"]["snn_over_ann"]),
         ("(iii) + memory, weights streamed", lambda r: r["memory"]["streamed"]["snn_over_ann"]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an export folder, a checkpoint folder or qwen2-tiny")
    p.add_argument("--timesteps", default="4,6,8", help="comma-separated T values")
    p.add_argument("--data", default=None, help="text to run (default: the bundled heldout.txt)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (checkpoint only)")
    p.add_argument("--png", default="energy_pareto.png", help="where to write the Pareto plot")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p.parse_args()


def runs_from_export(folder: str, windows, timesteps: list[int], batch_size: int) -> list[dict]:
    from ann2snn.report import build_reports

    return build_reports(folder, windows, timesteps, batch_size=batch_size, progress=True)["runs"]


def runs_from_checkpoint(name: str, timesteps: list[int], windows, batch_size: int, calib_samples: int,
                         seq_len: int) -> list[dict]:
    import ann2snn
    from ann2snn.convert import calibrate
    from ann2snn.report import build_report

    ann, tokenizer = ann2snn.load_ann(name)
    statistics, info = calibrate(ann, tokenizer, calib_samples=calib_samples, seq_len=seq_len, progress=False)
    runs = []
    for t in timesteps:
        snn = ann2snn.convert(copy.deepcopy(ann), timesteps=t, statistics=statistics, calibration_info=info,
                              progress=False)
        runs.append(build_report(snn, windows, batch_size=batch_size))
        del snn
    return runs


SPIKING_ONLY = (("(i) spiking layers only", lambda r: r["energy"]["spiking_layers_only"]["snn_over_ann"]),
                ("(ii) spiking layers only", lambda r: r["energy_integer"]["spiking_layers_only"]["snn_over_ann"]))


def table(runs: list[dict]) -> list[str]:
    columns = VIEWS + SPIKING_ONLY
    lines = ["| T | levels | PPL ANN | PPL SNN | PPL ratio | firing rate | " + " | ".join(n for n, _ in columns) + " |",
             "|" + "---|" * (6 + len(columns))]
    for r in runs:
        lines.append(f"| {r['timesteps']} | {r['levels']} | {r['ppl_ann']:.3f} | {r['ppl_snn']:.3f} | "
                     f"{r['ppl_snn'] / r['ppl_ann']:.4f} | {r['totals']['firing_rate']:.3f} | "
                     + " | ".join(f"{ratio(r):.3f}" for _, ratio in columns) + " |")
    return lines


def breakdown(runs: list[dict]) -> list[str]:
    """Where the SNN's view-(i) energy goes, per T, in % of its total."""
    keys = list(runs[0]["energy"]["breakdown_pj"])
    snn_keys = [k for k in keys if not k.startswith("ann:")]
    lines = ["| T | " + " | ".join(snn_keys) + " |", "|" + "---|" * (1 + len(snn_keys))]
    for r in runs:
        total = r["energy"]["snn_pj"]
        lines.append(f"| {r['timesteps']} | " + " | ".join(f"{100 * r['energy']['breakdown_pj'][k] / total:.1f} %"
                                                          for k in snn_keys) + " |")
    return lines


def pareto_plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ratio in VIEWS:
        xs = [r["ppl_snn"] / r["ppl_ann"] for r in runs]
        ys = [ratio(r) for r in runs]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, r in zip(xs, ys, runs):
            ax.annotate(f"T={r['timesteps']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("PPL ratio SNN / ANN (lower is more faithful)")
    ax.set_ylabel("energy SNN / ANN (below 1: SNN cheaper)")
    if all(math.isfinite(ratio(r)) and ratio(r) > 0 for _, ratio in VIEWS for r in runs):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    import ann2snn
    from ann2snn.calibration.data import bundled_text, read_texts, token_windows

    timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    is_export = (Path(args.model) / "snn_config.json").is_file()
    tokenizer = ann2snn.load_tokenizer(args.model) if is_export else ann2snn.load_ann(args.model)[1]
    data = args.data or str(bundled_text("heldout.txt"))
    windows = token_windows(tokenizer, read_texts(data), args.seq_len, max_tokens=args.max_tokens)
    started = time.monotonic()
    with torch.no_grad():
        runs = (runs_from_export(args.model, windows, timesteps, args.batch_size) if is_export else
                runs_from_checkpoint(args.model, timesteps, windows, args.batch_size, args.calib_samples, args.seq_len))
    header = (f"{args.model}: {windows.shape[0]} windows × {windows.shape[1]} tokens of {data}, "
              f"{runs[0]['recipe']} recipe, {runs[0]['coding']} coding; {time.monotonic() - started:.0f} s")
    lines = [header, "", *table(runs), "", "Where the SNN's energy goes, view (i):", "", *breakdown(runs)]
    print("\n".join(lines))
    pareto_plot(runs, Path(args.png), f"{Path(args.model).name}: energy vs fidelity")
    print(f"\nPareto plot → {args.png}")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
