"""Which operand limits: calibrated vs held-out per-channel maxima per site, and the bound of one site at a time.

    python benchmarks/site_ranges.py CHECKPOINT --calib-data FILE --data FILE[,FILE...]
        [--timesteps 8] [--sites down,qkv_in,...] [--max-tokens 1024] [--seq-len 128] [--calib-samples 32]

Calibrates on --calib-data (32 × 128 tokens as `ann2snn convert`; "bundled" for
the bundled text), then per --data set:

1. per site type (the same site in every layer), the worst ratio over layers and
   channels of the held-out max |x| to the calibrated max (channels whose held-out
   max is below 1e-3 of the site's calibrated max are left out), where it is,
   the ratio of the first token alone there (1 = the first token carries it),
   how many channels go past 2×, 4×, 8× their calibrated max, the calibration's
   heaviest channel tail (max / 99.9th percentile, worst layer) and the range
   steps "auto" gives that site type (fewest–most over layers);
2. with --sites, the PPL ratio (fast simulation = the SNN's bound) at each T of
   the default conversion with only that site type quantised (every other
   neuron passes its input through), "all" for every site, and "no-range" for
   every site without range steps.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ann2snn  # noqa: E402
from ann2snn.calibration.calibrate import collect_statistics  # noqa: E402
from ann2snn.calibration.data import read_texts, token_windows  # noqa: E402
from ann2snn.calibration.thresholds import MIN_CLIP, range_steps  # noqa: E402
from ann2snn.evaluate import logits_over, perplexity  # noqa: E402
from ann2snn.modules.neuron import SignedNeuron, set_simulation  # noqa: E402
from ann2snn.recipes import get_recipe  # noqa: E402

GROUPS = {"qkv_in": r"self_attn\.(q|k|v)_proj\.neuron$", "o_in": r"o_proj\.neuron$", "gate_up_in": r"mlp\.(gate|up)_proj\.neuron$",
          "down": r"down_proj\.neuron$", "act": r"act_fn\.neuron$", "attn_q": r"snn\.q_neuron$", "attn_k": r"snn\.k_neuron$",
          "attn_v": r"snn\.v_neuron$", "softmax": r"softmax\.neuron$", "head": r"^lm_head\.neuron$"}


def site_type(site: str) -> str:
    return re.sub(r"model\.layers\.\d+\.", "", site)


def exceedance_table(calib: dict, held: dict, first: dict, code) -> list[str]:
    rows: dict[str, dict] = {}
    for site, stats in calib.items():
        cal = stats["absmax"]
        ratio = held[site]["absmax"] / cal.clamp_min(MIN_CLIP)
        ratio = torch.where(held[site]["absmax"] > 1e-3 * cal.max(), ratio, torch.zeros_like(ratio)).flatten()
        row = rows.setdefault(site_type(site), {"worst": -1.0, "gt": [0, 0, 0], "tail": 0.0, "steps": []})
        if ratio.max() > row["worst"]:
            where = ratio.argmax()
            row.update(worst=ratio.max().item(), at=site,
                       first=(first[site]["absmax"].flatten()[where] / cal.flatten()[where].clamp_min(MIN_CLIP)).item())
        for i, limit in enumerate((2, 4, 8)):
            row["gt"][i] += int((ratio > limit).sum())
        row["tail"] = max(row["tail"], (cal / stats["p99.9"].clamp_min(MIN_CLIP)).max().item())
        row["steps"].append(range_steps(stats, "auto", code))
    lines = ["| site | worst held-out / calibrated max | at | first token there | channels > 2× / 4× / 8× | heaviest calibration tail | auto range steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['worst']:.2f} | {r['at'].split('.')[2] if r['at'].startswith('model.layers.') else '—'} | {r['first']:.2f} | {' / '.join(map(str, r['gt']))} | "
                     f"{r['tail']:.1f} | {min(r['steps'])}–{max(r['steps'])} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--calib-data", default="bundled")
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", default="8")
    p.add_argument("--sites", default="", help=f"comma-separated, of all,no-range,{','.join(GROUPS)}")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ann, tok = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
    recipe = get_recipe("qwen2")
    calib_data = None if args.calib_data == "bundled" else args.calib_data
    calib = collect_statistics(ann, recipe, token_windows(tok, read_texts(calib_data), args.seq_len, args.calib_samples, 0),
                               progress=False)
    sites = [s for s in args.sites.split(",") if s]
    for data in args.data.split(","):
        windows = token_windows(tok, read_texts(data), args.seq_len, samples=None, max_tokens=args.max_tokens)
        held = collect_statistics(ann, recipe, windows, progress=False)
        first = collect_statistics(ann, recipe, windows[:, :1], progress=False)  # causal: the first token's own activations
        print(f"\n## {args.checkpoint}: calibrated on {args.calib_data}, held-out {Path(data).name} ({windows.numel()} tokens)\n")
        print("\n".join(exceedance_table(calib, held, first, recipe.code)), flush=True)
        if not sites:
            continue
        reference = logits_over(ann, windows, "ann")
        ppl_ann = perplexity(reference, windows)
        print(f"\nANN perplexity {ppl_ann:.3f}; PPL ratio (bound) with one site type quantised\n")
        print("| T | quantised | PPL ratio | top-1 |\n|---|---|---|---|")
        for t in (int(x) for x in args.timesteps.split(",")):
            for chosen in sites:
                snn = ann2snn.convert(copy.deepcopy(ann), tok, timesteps=t, statistics=calib, progress=False,
                                      range_steps=0 if chosen == "no-range" else None)
                set_simulation(snn, "fast")
                if chosen not in ("all", "no-range"):
                    set_simulation(snn, "ann")
                    for name, module in snn.named_modules():
                        if isinstance(module, SignedNeuron) and re.search(GROUPS[chosen], name):
                            module.simulation = "fast"
                logits = logits_over(snn, windows, "fast") if chosen in ("all", "no-range") else _partial(snn, windows)
                top1 = (logits[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1)).float().mean().item()
                print(f"| {t} | {chosen} | {perplexity(logits, windows) / ppl_ann:.4f} | {100 * top1:.1f} % |", flush=True)
                del snn
    return 0


@torch.no_grad()
def _partial(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Logits with each neuron's simulation as set (logits_over would switch them all)."""
    return torch.cat([model(input_ids=windows[i:i + batch_size], use_cache=False).logits.float()
                      for i in range(0, windows.shape[0], batch_size)])


if __name__ == "__main__":
    sys.exit(main())
