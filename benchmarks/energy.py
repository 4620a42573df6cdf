"""SNN/ANN energy in three views beside the perplexity ratio, at each T, for ann2snn's default, ann2snn with
one of its energy changes undone, and spikingjelly's Qwen2 recipe: a table and a Pareto plot.

    python benchmarks/energy.py MODEL [--timesteps 4,6,8,10,16] [--data FILE] [--max-tokens 512]
        [--variants default,spikingjelly,half-rule,separate-inputs,float-head] [--spikingjelly-model DIR]
        [--spikingjelly-max-tokens N] [--seq-len 128] [--batch-size 4] [--calib-samples 16]
        [--png energy_pareto.png] [--markdown OUT.md] [--json OUT.json] [--from-json A.json,B.json]

MODEL is a checkpoint / "qwen2-tiny" (calibrated once on the bundled text with
--calib-samples windows, then converted at each T by `ann2snn.convert` with the
library's defaults) or an export folder (`ann2snn convert --out`; other T than
its own are rebuilt from its calibration statistics, as `ann2snn report
--timesteps`; the default variant only). Each T runs the model as ANN and as
SNN (step simulation) over the same windows of --data (default: the bundled
held-out text) with `ann2snn.report.build_report`, so every ann2snn figure is
one that `ann2snn report` writes:

- PPL ratio: PPL(SNN) / PPL(ANN) on those windows;
- (i): the field's convention, 45 nm fp32 operations (E_MAC 4.6, E_AC 0.9 pJ),
  shifts per output accumulator per weighted step, neuron updates charged,
  causal attention in both; `runs[i].energy.snn_over_ann`;
- (ii): against an integer ANN with b = ⌈log2 levels⌉-bit activations, 16-bit
  weights and 32-bit accumulators; `runs[i].energy_integer`;
- (iii): (i) plus memory traffic, weights on chip (one SRAM read per MAC / AC)
  or streamed from DRAM (once per pass; the SNN's spiking layers once per step);
  `runs[i].memory`.

Variants (--variants; each T runs them in this order, the tables list them by variant):

- default: what `ann2snn.convert` gives at that T;
- half-rule: the default with each neuron firing at ½·w_t instead of ¾·w_t
  (the firing rule before the minimal-weight one; also exact, more spikes). The
  library has no option for it: the benchmark sets every neuron's
  `firing_thresholds` buffer to ½·w_t after conversion;
- separate-inputs: the recipe with `share_inputs=False` (q/k/v and gate/up each
  encode their input with their own neuron);
- float-head: the recipe with `spiking_head=False` (lm_head a float matmul);
- spikingjelly: spikingjelly 2.0's Qwen2 recipe at T (`fidelity.spikingjelly_qwen2`,
  as benchmarks/fidelity.py runs it), counted by ann2snn's counter and priced
  by its energy model as `spikingjelly_counts` describes: two rows, its float
  stages as it runs them (every step) and once on the summed values (its lower
  bound). It serves Qwen2 checkpoints only: for another architecture give the
  same network as a Qwen2 checkpoint (--spikingjelly-model, e.g.
  `real_model.py --qwen2`); its ANN perplexity must match. It may run on the
  first --spikingjelly-max-tokens tokens only (its ANN then scored on those).

The Pareto plot has one panel per view, (i) and (ii), with every variant's
(PPL ratio, energy ratio) points: below 1 on the energy axis the SNN is
cheaper, left is more faithful.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ann2snn  # noqa: E402
from ann2snn.modules.neuron import SignedNeuron  # noqa: E402
from ann2snn.recipes import get_recipe  # noqa: E402

VARIANTS = {
    "default": "ann2snn default",
    "half-rule": "ann2snn, ½·w_t firing rule",
    "separate-inputs": "ann2snn, share_inputs=False",
    "float-head": "ann2snn, spiking_head=False",
    "spikingjelly": "spikingjelly Qwen2",
}
RECIPE_SWITCHES = {"separate-inputs": {"share_inputs": False}, "float-head": {"spiking_head": False}}
COLUMNS = (("(i) fp32 ops", "i"), ("(ii) vs integer ANN", "ii"), ("(iii) weights on chip", "iii_stationary"),
           ("(iii) weights streamed", "iii_streamed"), ("(i) spiking layers only", "i_spiking"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an export folder, a checkpoint folder or qwen2-tiny")
    p.add_argument("--timesteps", default="4,6,8,10,16", help="comma-separated T values")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--spikingjelly-model", default=None,
                   help="the same network as a Qwen2 checkpoint, for spikingjelly (default: MODEL)")
    p.add_argument("--spikingjelly-max-tokens", type=int, default=None,
                   help="spikingjelly on the first N tokens of the windows only (default: all)")
    p.add_argument("--data", default=None, help="text to run (default: the bundled heldout.txt)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (checkpoint only)")
    p.add_argument("--png", default="energy_pareto.png", help="where to write the Pareto plot")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--json", default=None, help="also write the rows to this file (after each row)")
    p.add_argument("--from-json", default=None,
                   help="no run: tables and plot from the rows of comma-separated files written by --json")
    args = p.parse_args()
    args.timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants takes names from {','.join(VARIANTS)}, got {','.join(args.variants)}")
    return args


# ----------------------------------------------------------------------------- ann2snn


def half_rule(model) -> None:
    """Every neuron fires at θ_t = ½·w_t (exact like ¾·w_t, `SpikeCode.firing_thresholds`, but not minimal)."""
    for module in model.modules():
        if isinstance(module, SignedNeuron):
            module.firing_thresholds.copy_(0.5 * module.weights)


def ann2snn_row(variant: str, run: dict) -> dict:
    return {"variant": variant, "T": run["timesteps"], "levels": run["levels"], "ppl_ann": run["ppl_ann"],
            "ppl_snn": run["ppl_snn"], "ppl_ratio": run["ppl_snn"] / run["ppl_ann"],
            "firing_rate": run["totals"]["firing_rate"], "i": run["energy"]["snn_over_ann"],
            "ii": run["energy_integer"]["snn_over_ann"], "iii_stationary": run["memory"]["stationary"]["snn_over_ann"],
            "iii_streamed": run["memory"]["streamed"]["snn_over_ann"],
            "i_spiking": run["energy"]["spiking_layers_only"]["snn_over_ann"],
            "breakdown": {k: v / run["energy"]["snn_pj"] for k, v in run["energy"]["breakdown_pj"].items()
                          if not k.startswith("ann:")}}


class Ann2snnRuns:
    """A checkpoint calibrated once, converted per variant and T, each conversion reported over the windows."""

    def __init__(self, name: str, batch_size: int, calib_samples: int, seq_len: int):
        from ann2snn.convert import calibrate

        self.ann, self.tokenizer = ann2snn.load_ann(name)
        self.batch_size = batch_size
        self.statistics, self.info = calibrate(self.ann, self.tokenizer, calib_samples=calib_samples,
                                               seq_len=seq_len, progress=False)

    def run(self, variant: str, timesteps: int, windows: torch.Tensor) -> dict:
        from ann2snn.report import build_report

        options = {}
        if variant in RECIPE_SWITCHES:  # convert's default recipe with one switch changed
            options["recipe"] = get_recipe("qwen2").with_options(**RECIPE_SWITCHES[variant])
        snn = ann2snn.convert(copy.deepcopy(self.ann), self.tokenizer, timesteps=timesteps, statistics=self.statistics,
                              calibration_info=self.info, progress=False, **options)
        if variant == "half-rule":
            half_rule(snn)
        return build_report(snn, windows, batch_size=self.batch_size, progress=False)


# ----------------------------------------------------------------------------- spikingjelly


def spikingjelly_rows(checkpoint: str, windows, ann_run: dict, timesteps: int, batch_size: int, calib_samples: int,
                      seq_len: int) -> list[dict]:
    """spikingjelly's Qwen2 recipe at T over `windows`, counted; one row per schedule ("as run", "once")."""
    from ann2snn.calibration.data import calibration_windows
    from fidelity import spikingjelly_forward, spikingjelly_qwen2
    from spikingjelly_counts import SpikingjellyCounts, energy_views

    ann, tokenizer = ann2snn.load_ann(checkpoint)
    ann.eval()
    calib = calibration_windows(tokenizer, None, calib_samples, seq_len, 0)  # ann2snn's calibration windows
    snn = spikingjelly_qwen2(ann, calib, timesteps, batch_size)
    forward = spikingjelly_forward(snn)
    counts = SpikingjellyCounts(snn)
    nll_ann = nll_snn = 0.0
    scored = 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size]
            targets = ids[:, 1:].reshape(-1)
            handles = counts.hooks()
            try:
                logits = forward(ids).float()
            finally:
                for handle in handles:
                    handle.remove()
            vocab = logits.shape[-1]
            nll_snn += float(F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
            logits_ann = ann(input_ids=ids, use_cache=False).logits.float()
            nll_ann += float(F.cross_entropy(logits_ann[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
            scored += targets.numel()
    ppl_ann, ppl_snn = math.exp(nll_ann / scored), math.exp(nll_snn / scored)
    rows = []
    for schedule in ("as run", "once"):
        views = energy_views(counts, int(windows.numel()), ann_run, schedule)
        rows.append({"variant": f"spikingjelly, float {'every step' if schedule == 'as run' else 'once'}",
                     "T": timesteps, "levels": 2 * timesteps + 1, "ppl_ann": ppl_ann, "ppl_snn": ppl_snn,
                     "ppl_ratio": ppl_snn / ppl_ann, "firing_rate": views["firing_rate"], "i": views["i"],
                     "ii": views["ii"], "iii_stationary": views["iii_stationary"],
                     "iii_streamed": views["iii_streamed"], "i_spiking": views["i_spiking_sites"],
                     "tokens": int(windows.numel())})
    return rows


# ----------------------------------------------------------------------------- output


def table(rows: list[dict]) -> list[str]:
    lines = ["| variant | T | levels | PPL ratio | firing rate | " + " | ".join(n for n, _ in COLUMNS) + " |",
             "|---|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['T']} | {r['levels']} | {r['ppl_ratio']:.4f} | {r['firing_rate']:.3f} | "
                     + " | ".join(f"{r[key]:.3f}" for _, key in COLUMNS) + " |")
    return lines


def breakdown(rows: list[dict]) -> list[str]:
    """Where the default's view-(i) energy goes, per T, in % of its total."""
    rows = [r for r in rows if r["variant"] == VARIANTS["default"]]
    if not rows:
        return []
    keys = list(rows[0]["breakdown"])
    lines = ["| T | " + " | ".join(keys) + " |", "|" + "---|" * (1 + len(keys))]
    for r in rows:
        lines.append(f"| {r['T']} | " + " | ".join(f"{100 * r['breakdown'][k]:.1f} %" for k in keys) + " |")
    return lines


def versus_spikingjelly(rows: list[dict]) -> list[str]:
    """For each spikingjelly row: the cheapest ann2snn default row at a PPL ratio no worse, in views (i) and (ii)."""
    ours = [r for r in rows if r["variant"] == VARIANTS["default"]]
    theirs = [r for r in rows if r["variant"].startswith("spikingjelly") and "every step" in r["variant"]]
    lines = ["| spikingjelly T | its PPL ratio | its (i): every step / once | ann2snn default at ≤ that PPL ratio: T, (i) "
             "| its (ii): every step / once | ann2snn: T, (ii) |", "|---|---|---|---|---|---|"]
    for r in theirs:
        once = next(o for o in rows if o["T"] == r["T"] and o["variant"].startswith("spikingjelly") and o is not r)
        fair = [o for o in ours if o["ppl_ratio"] <= r["ppl_ratio"]]
        best = {key: min(fair, key=lambda o: o[key]) if fair else None for key in ("i", "ii")}
        cell = {key: f"T={b['T']}, {b[key]:.3f}" if b else "none" for key, b in best.items()}
        lines.append(f"| {r['T']} | {r['ppl_ratio']:.4f} | {r['i']:.3f} / {once['i']:.3f} | {cell['i']} "
                     f"| {r['ii']:.3f} / {once['ii']:.3f} | {cell['ii']} |")
    return lines if theirs else []


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, (name, key) in zip(axes, COLUMNS[:2]):
        for variant in variants:
            points = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["T"])
            xs, ys = [r["ppl_ratio"] - 1 for r in points], [r[key] for r in points]
            theirs = variant.startswith("spikingjelly")
            ours = variant == VARIANTS["default"]
            ax.plot(xs, ys, marker="s" if theirs else "o", label=variant, linestyle="--" if theirs else "-",
                    linewidth=2.5 if ours else 1.5, zorder=3 if ours else 2)
            if theirs or ours:
                for x, y, r in zip(xs, ys, points):
                    ax.annotate(f"T={r['T']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        # The ratios run from just under 1 to far above it: symlog on PPL ratio − 1 spreads both.
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("PPL ratio SNN / ANN − 1 (symlog; left: more faithful)")
        ax.set_ylabel(f"energy SNN / ANN, {name} (below 1: SNN cheaper)")
        ax.set_title(f"{title}: view {name}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], header: str, args) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    rows = sorted(rows, key=lambda r: (variants.index(r["variant"]), r["T"]))
    lines = [header, "", *table(rows), "", "Against spikingjelly at equal or better PPL ratio:", "",
             *versus_spikingjelly(rows), "", "Where the default's energy goes, view (i):", "", *breakdown(rows)]
    print("\n".join(lines))
    pareto_plot(rows, Path(args.png), Path(args.model).name)
    print(f"\nPareto plot → {args.png}")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main():
    args = parse_args()
    if args.from_json:  # rows of one or more runs, in the order of the files
        saved = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.from_json.split(",")]
        report([r for run in saved for r in run["rows"]], "\n".join(run["header"] for run in saved), args)
        return
    from ann2snn.calibration.data import bundled_text, read_texts, token_windows
    from ann2snn.report import build_reports

    is_export = (Path(args.model) / "snn_config.json").is_file()
    if is_export and set(args.variants) != {"default"}:
        sys.exit("error: an export folder runs the default variant only; give the checkpoint for the others")
    data = args.data or str(bundled_text("heldout.txt"))
    started = time.monotonic()
    rows: list[dict] = []
    header = ""

    def keep(new: list[dict]) -> None:
        rows.extend(new)
        for r in new:
            print(f"  {r['variant']} T={r['T']}: PPL ratio {r['ppl_ratio']:.4f}, (i) {r['i']:.3f}, (ii) {r['ii']:.3f} "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1), encoding="utf-8")

    with torch.no_grad():
        if is_export:
            tokenizer = ann2snn.load_tokenizer(args.model)
            windows = token_windows(tokenizer, read_texts(data), args.seq_len, max_tokens=args.max_tokens)
            runs = build_reports(args.model, windows, args.timesteps, batch_size=args.batch_size, progress=True)["runs"]
            keep([ann2snn_row(VARIANTS["default"], run) for run in runs])
        else:
            models = Ann2snnRuns(args.model, args.batch_size, args.calib_samples, args.seq_len)
            windows = token_windows(models.tokenizer, read_texts(data), args.seq_len, max_tokens=args.max_tokens)
            reference = None  # a default run over these windows: the ANN's figures spikingjelly is set against
            for t in args.timesteps:
                for variant in args.variants:
                    if variant == "spikingjelly":  # the ANN's figures do not depend on T: the first default run's
                        reference = reference or models.run("default", t, windows)
                        sj_windows = windows[:max(1, (args.spikingjelly_max_tokens or windows.numel()) // windows.shape[1])]
                        keep(spikingjelly_rows(args.spikingjelly_model or args.model, sj_windows, reference, t,
                                               args.batch_size, args.calib_samples, args.seq_len))
                        continue
                    run = models.run(variant, t, windows)
                    reference = reference if reference or variant != "default" else run
                    keep([ann2snn_row(VARIANTS[variant], run)])
                    header = header or (f"{args.model}: {windows.shape[0]} windows × {windows.shape[1]} tokens of "
                                        f"{data}, {run['recipe']} recipe, {run['coding']} coding")
    header = (header or f"{args.model}: {windows.shape[0]} windows × {windows.shape[1]} tokens of {data}") \
        + f"; {time.monotonic() - started:.0f} s"
    keep([])
    report(rows, header, args)


if __name__ == "__main__":
    main()
