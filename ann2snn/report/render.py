"""A report written out: report.json, report.md and plots, into a folder that appears whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import atomic_folder, check_writable
from ..errors import ConfigError
from .build import combine


def _as_report(report: dict) -> dict:
    return report if "runs" in report else combine([report])


def _primary(report: dict) -> dict:
    return next((r for r in report["runs"] if r["timesteps"] == report["primary_timesteps"]), report["runs"][0])


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_json_safe(_as_report(report)), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def _n(value) -> str:
    return f"{int(value):,}"


def _f(value, digits=4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _energy(pj: float) -> str:
    for unit, scale in (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3f} {unit}"
    return f"{pj:.3f} pJ"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _own_windows(run: dict) -> str:
    """The sites that fire another T than the run's: how many fewer (per-site levels), and which more (the head)."""
    own = run.get("site_timesteps", {})
    below = sum(t < run["timesteps"] for t in own.values())
    notes = ([f"{below} sites fewer"] if below else []) + [f"{site} T={t}" for site, t in own.items() if t > run["timesteps"]]
    return f" ({', '.join(notes)})" if notes else ""


def _summary(report: dict) -> list[str]:
    rows = []
    for r in report["runs"]:
        e = r["energy"]
        levels = str(r["levels"]) + _own_windows(r)
        rows.append([str(r["timesteps"]), levels, _f(r["ppl_ann"], 3), _f(r["ppl_snn"], 3),
                     _f(r["ppl_snn"] / r["ppl_ann"] if r["ppl_ann"] else float("nan")), _f(r["top1_agreement"]),
                     _f(r["totals"]["firing_rate"]), _energy(e["ann_pj_per_token"]), _energy(e["snn_pj_per_token"]),
                     _f(e["snn_over_ann"], 3)])
    lines = _table(["T", "levels", "PPL ANN", "PPL SNN", "PPL ratio", "top-1 agreement", "firing rate",
                    "ANN energy/token", "SNN energy/token", "SNN/ANN energy"], rows)
    lines += ["", "## SNN/ANN energy, three views", ""]
    rows = []
    for r in report["runs"]:
        mem = r["memory"]
        rows.append([str(r["timesteps"]), _f(r["energy"]["snn_over_ann"], 3), _f(r["energy_integer"]["snn_over_ann"], 3),
                     _f(mem["stationary"]["snn_over_ann"], 3), _f(mem["streamed"]["snn_over_ann"], 3),
                     _f(r["energy"]["spiking_layers_only"]["snn_over_ann"], 3),
                     _f(r["energy_integer"]["spiking_layers_only"]["snn_over_ann"], 3)])
    lines += _table(["T", "(i) fp32 ops", "(ii) vs integer ANN", "(iii) + memory, weights on chip",
                     "(iii) + memory, weights streamed", "(i) spiking layers only", "(ii) spiking layers only"], rows)
    conventions = report.get("energy_conventions", {"i": report["energy_convention"]})
    lines += [""] + [f"- **({view})** `{c['name']}`: {c['text']}." for view, c in conventions.items()]
    return lines


def _operations(run: dict) -> list[str]:
    t, e, b = run["totals"], run["energy"], run["energy"]["breakdown_pj"]
    lines = _table(["quantity", "count", "energy (view i)"], [
        ["ANN: MACs of the spiking layers (attention: causal half)", _n(t["ann_mac"]), _energy(b["ann: spiking layers as MACs"])],
        ["SNN: spike-driven ACs", _n(t["snn_ac"]), _energy(b["snn: spike-driven ACs"])],
        ["SNN: shifts (per accumulator per weighted step)", _n(t["snn_shifts"]), _energy(b["snn: shifts of weighted steps"])],
        ["SNN: spikes", _n(t["spikes"]), "—"],
        ["SNN: neuron updates", _n(t["neuron_updates"]), _energy(b["snn: neuron updates"])],
        ["SNN: spike encoding (float x/Δ)", _n(t["snn_encoding_flops"]), _energy(b["snn: spike encoding (float)"])],
        ["both: bias additions", _n(t["bias_adds"]), _energy(b["both: bias additions"])],
        ["both: float MACs", _n(t["float_mac"]), _energy(b["both: float MACs"])],
        ["both: float FLOPs", _n(t["float_flops"]), _energy(b["both: float FLOPs"])],
        ["**ANN total**", "", f"**{_energy(e['ann_pj'])}** ({_energy(e['ann_pj_per_token'])}/token)"],
        ["**SNN total**", "", f"**{_energy(e['snn_pj'])}** ({_energy(e['snn_pj_per_token'])}/token)"],
    ])
    s = e["spiking_layers_only"]
    lines += ["", f"Spiking layers alone: SNN {_energy(s['snn_pj'])} vs ANN {_energy(s['ann_pj'])} "
              f"(ratio {_f(s['snn_over_ann'], 3)}).", ""]
    lines += ["### Memory traffic per token (view iii)", ""]
    rows = []
    for flow in ("stationary", "streamed"):
        for model in ("ann", "snn"):
            m = run["memory"][flow][model]
            rows.append([flow, model.upper(), _n(m["weight_bytes_per_token"]), _n(m["activation_bytes_per_token"]),
                         _energy(m["memory_pj_per_token"]), _energy(m["total_pj_per_token"])])
    lines += _table(["dataflow", "model", "weight bytes", "activation bytes", "memory energy", "memory + compute (i)"],
                    rows)
    lines += ["", "### Float bucket (stays floating point in both models)", ""]
    fo = run["float_operations"]
    rows = [[k, "MAC", _n(v), ""] for k, v in fo["mac"].items()]
    rows += [[k, "FLOP", _n(v), fo["costs"].get(k, "")] for k, v in fo["flops"].items()]
    return lines + _table(["operation", "unit", "count", "cost"], rows)


def _per_layer_and_module(run: dict) -> list[str]:
    lines = _table(["layer", "firing rate", "spikes", "SNN ACs", "shifts", "ANN MACs", "AC/MAC", "float FLOPs",
                    "cos(ANN, SNN)"],
                   [[str(r["layer"]), _f(r["firing_rate"]), _n(r["spikes"]), _n(r["ac"]), _n(r["shifts"]),
                     _n(r["ann_mac"]), _f(r["ac"] / r["ann_mac"] if r["ann_mac"] else float("nan"), 3),
                     _n(r["float_flops"]), _f(r["cosine_similarity"], 5)] for r in run["layers"]])
    lines += ["", f"## Per spiking module at T={run['timesteps']}", ""]
    modules = run["modules"]
    inputs = {m["input_neuron"] for m in modules.values() if m["kind"] == "synapsis"}
    rows = []
    for name, m in modules.items():
        if m["kind"] == "synapsis":
            neuron = modules.get(m["input_neuron"], {})
            rows.append([f"`{name}`", f"synapsis {m['in_features']}→{m['out_features']}", _f(neuron.get("firing_rate")),
                         _n(neuron.get("spikes", 0)), _n(m["ac"]), _n(m["shifts"]), _n(m["ann_mac"])])
        elif m["kind"] == "neuron" and (name not in inputs or "ac" in m):
            sink = [_n(m["ac"]), _n(m["shifts"])] if "ac" in m else ["", ""]
            rows.append([f"`{name}`", "neuron" + (" (→ attention sink)" if sink[0] else ""), _f(m["firing_rate"]),
                         _n(m["spikes"]), *sink, ""])
        elif m["kind"] == "snn_matmul":
            rows.append([f"`{name}`", "SNNMatmul", "", "", _n(m["ac"]), _n(m["shifts"]), _n(m["ann_mac"])])
    lines += ["A Synapsis row shows its input neuron's firing rate and spikes (`input_neuron` in report.json).", ""]
    return lines + _table(["module", "kind", "firing rate", "spikes", "SNN ACs", "shifts", "ANN MACs"], rows)


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    report = _as_report(report)
    run = _primary(report)
    lines = [f"# ann2snn report{': ' + report['export'] if report.get('export') else ''}", ""]
    lines += [f"Recipe **{report['recipe']}**, {report['coding']} coding; text `{report.get('data') or 'given windows'}`: "
              f"{report['windows']} window(s) × {report['seq_len']} tokens = {_n(report['tokens_processed'])} tokens "
              f"processed, {_n(report['tokens_scored'])} scored. ANN = the same weights with spiking off; SNN = step "
              "simulation (real spike trains).", ""]
    if any(r.get("finetuned") for r in report["runs"]):
        lines += ["**This export was fine-tuned**: the runs at its own T measure the fine-tuned model.", ""]
    lines += ["## Summary", ""] + _summary(report)
    lines += ["", "## Counting conventions", ""] + [f"- **{k}**: {v}" for k, v in report["conventions"].items()]
    lines += ["", f"## Operations and energy at T={run['timesteps']}", ""] + _operations(run)
    lines += ["", f"## Per layer at T={run['timesteps']}", ""] + _per_layer_and_module(run)
    if plots is not None:
        lines += ["", "## Plots", ""]
        lines += ([f"![{Path(p).stem}]({Path(p).name})" for p in plots] if plots
                  else ["(matplotlib is not installed: no plots; `pip install 'ann2snn[report]'`)"])
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str | Path, plots: list[str] | None = None) -> Path:
    path = Path(path)
    path.write_text(render_markdown(report, plots), encoding="utf-8")
    return path


def write_plots(report: dict, folder: str | Path) -> list[Path]:
    """firing_rate.png, cosine_similarity.png and (several T) perplexity_vs_T.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return []
    report, folder, written = _as_report(report), Path(folder), []

    def save(fig, ax, title, file):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / file, dpi=100)
        plt.close(fig)
        written.append(folder / file)

    for key, ylabel, title, file in (
            ("firing_rate", "nonzero spikes per neuron per step", "Firing rate per layer", "firing_rate.png"),
            ("cosine_similarity", "cosine similarity", "ANN vs SNN hidden states per layer", "cosine_similarity.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in report["runs"]:
            ax.plot([r["layer"] for r in run["layers"]],
                    [r[key] if r[key] is not None else float("nan") for r in run["layers"]], marker="o",
                    label=f"T={run['timesteps']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        save(fig, ax, title, file)
    if len(report["runs"]) > 1:
        runs = sorted(report["runs"], key=lambda r: r["timesteps"])
        fig, ax = plt.subplots(figsize=(7, 4))
        xs, ys = [r["timesteps"] for r in runs], [r["ppl_snn"] for r in runs]
        ax.plot(xs, ys, marker="o", label="SNN")
        ax.axhline(runs[0]["ppl_ann"], color="gray", linestyle="--", label="ANN (same weights)")
        ax.set_xticks(xs)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("perplexity")
        finite = [y for y in ys + [runs[0]["ppl_ann"]] if y is not None and math.isfinite(y) and y > 0]
        if finite and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        save(fig, ax, f"Perplexity vs T ({report['coding']} coding)", "perplexity_vs_T.png")
    return written


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an --out that holds something, unless --overwrite and it is a report folder."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        check_writable(out, ConfigError)
        return out
    if not overwrite:
        raise ConfigError(f"report folder {out} already exists; choose another --out or pass --overwrite")
    if not out.is_dir() or not _is_report(out):
        raise ConfigError(f"{out} is not an ann2snn report folder (no report.json); --overwrite replaces only a "
                          "report or an empty folder: choose another --out")
    check_writable(out, ConfigError)
    return out


def _is_report(folder: Path) -> bool:
    try:
        return "report_version" in json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def write_report(report: dict, out_dir: str | Path, overwrite: bool = False) -> tuple[Path, list[Path]]:
    """report.json, report.md and the plots into `out_dir`, atomically (a hidden sibling renamed into place).

    Takes an empty `out_dir`; refuses one that holds something unless `overwrite` and it is a report folder
    (`check_out`), which is then replaced whole. Returns (out_dir, plots written).
    """
    out = check_out(out_dir, overwrite)
    with atomic_folder(out, ConfigError, overwrite=out.exists()) as tmp:
        plots = write_plots(report, tmp)
        write_json(report, tmp / "report.json")
        write_markdown(report, tmp / "report.md", [p.name for p in plots])
    return out, [out / p.name for p in plots]
