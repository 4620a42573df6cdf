"""Inference speed: the ANN, ann2snn's SNN (step and fast simulation) and spikingjelly 2.0's Qwen2 recipe, same tokens.

    python benchmarks/speed.py [MODEL] [--data FILE] [--samples 8] [--seq-len 128] [--batch 4]
                               [--timesteps 8,16,32] [--repeats 5] [--threads 2] [--clock wall|cpu]
                               [--sj-stats-off] [--profile]

MODEL is ``qwen2-tiny`` (default) or a local checkpoint folder. Every method runs
over the same token windows (``--samples`` windows of ``--seq-len`` tokens of
``--data``, default the held-out text), in batches of ``--batch``, under
``torch.no_grad``, after a one-batch warm-up; the time is the median of
``--repeats`` full passes, the methods taking turns pass by pass (the machine is
shared: interleaving keeps each ratio's two sides under the same load; the
fastest pass of each method is printed too). ``--clock cpu --threads 1`` times
CPU time instead of wall time, which other jobs on the cores barely disturb. Rows:

- ``hf ann``: the unconverted transformers model (sdpa attention), for reference;
- ``ann``: the converted model with ``set_simulation(model, "ann")`` (spiking off);
- ann2snn ``step``: ``set_simulation(model, "step")`` — every neuron fires T steps;
- ann2snn ``fast``: the accumulated spike counts in closed form (same numbers);
- spikingjelly: ``Qwen2SNNModel`` (``signed_if`` encoding, explicit [T, B, S, H]
  sequences) with ``Qwen2SNNConfig(time_steps=T, calibration_levels=min(16, T))``.

ann2snn runs phase coding at T ≤ 23 (its default) and rate coding at every T
(phase coding stops at 23 steps), so T = 8 and 16 have both. ann2snn's
calibration statistics are gathered once (they do not depend on coding or T)
on the bundled training text; spikingjelly calibrates on the same windows.
Speed does not depend on the calibration: every op is dense.

Ratios (targets in brackets):
    step / (T·ann)   ann2snn step time over T ANN passes          (≤ 1.5)
    sj / step        spikingjelly time over ann2snn step time      (≥ 2)

``--profile`` then runs torch.profiler over one batch of ann2snn's step mode at
the first T (phase) and the last T (rate) and prints the ops that dominate.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ann2snn  # noqa: E402
from ann2snn.calibration.data import bundled_text, read_texts, token_windows  # noqa: E402
from ann2snn.convert import calibrate  # noqa: E402
from ann2snn.recipes import get_recipe  # noqa: E402

STEP_TARGET = 1.5
SJ_TARGET = 2.0


CLOCK = time.perf_counter  # --clock cpu: time.process_time (use with --threads 1)


def one_pass(run, windows: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    """(seconds of one full pass over windows, the next-token argmax of every position)."""
    t0 = CLOCK()
    out = [run(windows[start:start + batch]).argmax(-1) for start in range(0, windows.shape[0], batch)]
    return CLOCK() - t0, torch.cat(out)


@torch.no_grad()
def interleaved(runners: dict, windows: torch.Tensor, batch: int, repeats: int) -> dict:
    """label → (median seconds per pass, argmax of the last pass).

    The machine is shared, so the methods take turns: repeat r runs one pass of every method
    before repeat r+1 starts, and ratios compare passes made under the same load.
    """
    for prepare, run in runners.values():
        prepare()
        run(windows[:batch])  # warm-up: one batch
    times = {label: [] for label in runners}
    tops = {}
    for _ in range(repeats):
        for label, (prepare, run) in runners.items():
            prepare()
            seconds, tops[label] = one_pass(run, windows, batch)
            times[label].append(seconds)
    return {label: (statistics.median(times[label]), tops[label], times[label]) for label in runners}


def hf_runner(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def sj_runner(model):
    """spikingjelly's TD modules keep x_cum / y_cum and IF membranes between calls (a second call without
    a reset gives garbage logits), so every forward starts with functional.reset_net, as SpikingJelly expects."""
    from spikingjelly.activation_based import functional

    def run(ids):
        functional.reset_net(model)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return run


def profile_step(model, ids: torch.Tensor, label: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    ann2snn.set_simulation(model, "step")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            with record_function(label):
                model(input_ids=ids, use_cache=False)
    print(f"\n--- torch.profiler, ann2snn step mode, {label}, one batch {tuple(ids.shape)} (self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
    ann2snn.set_simulation(model, "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="qwen2-tiny", help="qwen2-tiny or a local checkpoint folder")
    parser.add_argument("--data", type=Path, default=bundled_text("heldout.txt"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--timesteps", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--no-spikingjelly", action="store_true")
    parser.add_argument("--sj-stats-off", action="store_true",
                        help="also time spikingjelly with set_collect_statistics(False) (its default collects spike statistics)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the step mode")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: the process's CPU time (with --threads 1 it does not count "
                             "the time other jobs hold the cores, so ratios stay stable on a shared machine)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ann2snn.models import parse_dtype

    ann, tokenizer = ann2snn.load_ann(args.model, parse_dtype(args.dtype))
    windows = token_windows(tokenizer, read_texts(args.data), args.seq_len, args.samples, seed=0)
    tokens = windows.numel()
    dtype = next(ann.parameters()).dtype
    params = sum(p.numel() for p in ann.parameters())
    print(f"model {args.model}: {params / 1e6:.2f} M parameters, {dtype}, {ann.config.num_hidden_layers} layers, "
          f"hidden {ann.config.hidden_size}")
    print(f"tokens: {tuple(windows.shape)} windows of {args.data.name} = {tokens} tokens, batch {args.batch}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, median of {args.repeats} passes after a 1-batch warm-up; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    timesteps = [int(t) for t in args.timesteps.split(",")]
    recipe = get_recipe("qwen2")
    stats, info = calibrate(copy.deepcopy(ann), tokenizer, recipe, None, args.calib_samples, args.seq_len, 0, False)
    calib_windows = token_windows(tokenizer, read_texts(None), args.seq_len, args.calib_samples, 0)

    nothing = lambda: None  # noqa: E731
    rows, profiled = [], {}
    for T in timesteps:
        runners = {"hf": (nothing, hf_runner(ann))}
        if not args.no_spikingjelly:
            from spikingjelly.activation_based.ann2snn.recipes.qwen2 import Qwen2SNNConfig, Qwen2SNNModel, calibrate_qwen2_snn

            cfg = Qwen2SNNConfig(time_steps=T, calibration_levels=min(16, T))
            batches = [{"input_ids": calib_windows[i:i + args.batch], "attention_mask": torch.ones_like(calib_windows[i:i + args.batch])}
                       for i in range(0, calib_windows.shape[0], args.batch)]
            with torch.no_grad():
                calib = calibrate_qwen2_snn(ann, batches, cfg)
            sj = Qwen2SNNModel(ann, calib, cfg).eval()
            runners["sj"] = (lambda sj=sj: sj.set_collect_statistics(True), sj_runner(sj))
            if args.sj_stats_off:
                runners["sj_off"] = (lambda sj=sj: sj.set_collect_statistics(False), sj_runner(sj))
        models = {}
        for coding in ("phase", "rate"):
            if coding == "phase" and T > 23:
                continue
            snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, timesteps=T, coding=coding, statistics=stats,
                                  calibration_info=info, progress=False)
            models[coding] = snn
            for simulation in ("ann", "fast", "step"):
                runners[(coding, simulation)] = (lambda snn=snn, simulation=simulation: ann2snn.set_simulation(snn, simulation),
                                                 hf_runner(snn))
        load_before = os.getloadavg()[0]
        measured = interleaved(runners, windows, args.batch, args.repeats)
        hf_s, hf_top, _ = measured["hf"]
        agree = {label: (top == hf_top).float().mean().item() for label, (_, top, _) in measured.items()}
        for label, (seconds, _, all_times) in measured.items():
            name = label if isinstance(label, str) else f"ann2snn {label[0]} {label[1]}"
            print(f"T={T:<3} {name:<22} {seconds * 1e3:9.1f} ms  {tokens / seconds:8.0f} tok/s  top-1 vs ANN {agree[label]:.3f}   "
                  f"passes: {', '.join(f'{t:.2f}' for t in all_times)} s", flush=True)
        print(f"      (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)", flush=True)
        for coding, snn in models.items():
            best = {sim: min(measured[(coding, sim)][2]) for sim in ("ann", "step")}
            rows.append({"T": T, "coding": coding, "hf": hf_s, "hf_best": min(measured["hf"][2]),
                         "best": best, "sj_best": min(measured["sj"][2]) if "sj" in measured else None,
                         **{sim: measured[(coding, sim)][0] for sim in ("ann", "fast", "step")},
                         "step_agree": agree[(coding, "step")],
                         "sj_s": measured["sj"][0] if "sj" in measured else None,
                         "sj_agree": agree.get("sj", float("nan")),
                         "sj_off_s": measured["sj_off"][0] if "sj_off" in measured else None})
            if args.profile and ((T == timesteps[0] and coding == "phase") or (T == timesteps[-1] and coding == "rate")):
                profiled[(T, coding)] = snn
        del runners, models

    print(f"\n{tokens} tokens per pass; tok/s (median of {args.repeats} interleaved passes); top-1 = agreement of next-token argmax with the hf ANN")
    header = (f"{'T':>3} {'coding':<6} {'hf ann':>9} {'ann':>9} {'fast':>9} {'step':>9} {'spikingj.':>9} "
              f"{'step/(T·ann)':>12} {'sj/step':>8} {'step top-1':>10} {'sj top-1':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["step"] / (r["T"] * r["ann"])
        sj_ratio = r["sj_s"] / r["step"] if r["sj_s"] else float("nan")
        print(f"{r['T']:>3} {r['coding']:<6} {tokens / r['hf']:>9.0f} {tokens / r['ann']:>9.0f} {tokens / r['fast']:>9.0f} "
              f"{tokens / r['step']:>9.0f} {tokens / r['sj_s'] if r['sj_s'] else float('nan'):>9.0f} "
              f"{ratio:>8.2f} {'ok' if ratio <= STEP_TARGET else 'MISS':>3} {sj_ratio:>4.2f} {'ok' if sj_ratio >= SJ_TARGET else 'MISS':>3} "
              f"{r['step_agree']:>10.3f} {r['sj_agree']:>8.3f}")
    print("\nthe same ratios from each method's fastest pass (least disturbed by the other jobs on this machine):")
    for r in rows:
        ratio = r["best"]["step"] / (r["T"] * r["best"]["ann"])
        hf_ratio = r["best"]["step"] / (r["T"] * r["hf_best"])
        sj_ratio = r["sj_best"] / r["best"]["step"] if r["sj_best"] else float("nan")
        print(f"  T={r['T']:<3} {r['coding']:<6} step/(T·ann) {ratio:5.2f}   step/(T·hf ann) {hf_ratio:5.2f}   sj/step {sj_ratio:5.2f}")
    if any(r["sj_off_s"] for r in rows):
        print("spikingjelly with set_collect_statistics(False): " + ", ".join(
            f"T={r['T']} {tokens / r['sj_off_s']:.0f} tok/s (sj/step {r['sj_off_s'] / r['step']:.2f} vs {r['coding']})"
            for r in rows if r["sj_off_s"]))
    print(f"targets: step/(T·ann) ≤ {STEP_TARGET}, sj/step ≥ {SJ_TARGET}  (ann = the converted model with spiking off); "
          f"load average now {os.getloadavg()[0]:.1f}")

    for (T, coding), snn in profiled.items():
        profile_step(snn, windows[: args.batch], f"T={T} {coding}")


if __name__ == "__main__":
    main()
