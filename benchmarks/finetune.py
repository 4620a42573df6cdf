"""Does fine-tuning close the gap between a converted SNN and its ANN on text it never saw, and never widen it?

    python benchmarks/finetune.py [CHECKPOINT] [-T 4,6,8] [--seeds 0,1,2] [--rules distill,distill-thresholds,stdp]
        [--steps 200] [--stdp-steps 96] [--train TEXT] [--train-chars 300000] [--calib-data TEXT]
        [--eval heldout.txt,unseen.txt] [--max-eval-tokens 8192] [--seq-len 128] [--train-seq-len N]
        [--batch-size 4] [--calib-samples 32] [--coding phase] [--options JSON] [--stdp-options JSON]
        [--no-guard] [--threads 1] [--json OUT.json]

CHECKPOINT defaults to the embedded "qwen2-tiny"; any checkpoint that
``ann2snn.load_ann`` takes works (e.g. /work/models/SmolLM2-135M-Instruct).

For each T the model is converted once (the library defaults: qwen2 recipe,
MSE thresholds, --calib-samples windows of --seq-len tokens of --calib-data,
default the bundled training text); then each rule fine-tunes its own copy of
that SNN with each seed (the batch order) on the first --train-chars characters
of --train (default the bundled training text, Jane Austen), with `finetune`'s
defaults (``distill``: thresholds and weights; ``distill-thresholds``:
``train_weights=False``; ``stdp``: weights and thresholds, ``stdp-thresholds``: the
thresholds only): the last tenth of
those windows (or --holdout, a share) is the holdout that decides whether to
fine-tune at all and whether to keep the result, and the bundled probe text
(code, logs, a manual) is the guard that undoes a fine-tune making it worse
(--no-guard: none). Figures are measured on text no stage ever saw, in
non-overlapping windows of --seq-len tokens, at most --max-eval-tokens each,
of each --eval text (a bundled text's name, or a file or folder): by default
``heldout.txt`` (the end of *Persuasion*: the training text's kind) and
``unseen.txt`` (Melville and others: another kind).

gap closed = 100·(gap_before − gap_after)/gap_before, gap = PPL(SNN) − PPL(ANN),
against the converted model's ANN (spiking off, original weights). The noise
column is the largest over the seeds of 2 standard errors of the change (the
per-window NLL after − before on the same windows, paired; as perplexity, in %
of the gap): a change within it is not distinguishable from chance.

As each seed ends, a line on stderr gives its gap closed and how many of the
windows it made better (a mean carried by a few heavy windows shows there);
--json holds the same per seed, rewritten after each seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.calibration.data import bundled_text, read_texts, token_windows  # noqa: E402
from ann2snn.evaluate import logits_over  # noqa: E402
from ann2snn.finetune import HoldoutWarning, finetune  # noqa: E402
from ann2snn.finetune.holdout import noise  # noqa: E402

RULES = {"distill": ("distill", {}), "distill-thresholds": ("distill", {"train_weights": False}), "stdp": ("stdp", {}),
         "stdp-thresholds": ("stdp", {"train_weights": False})}


def text_path(name: str) -> Path:
    """A bundled text by name (heldout.txt), else a file or folder."""
    return bundled_text(name) if (bundled_text("train.txt").parent / name).is_file() else Path(name)


def nll_per_window(model, windows, simulation) -> torch.Tensor:
    logits = logits_over(model, windows, simulation)
    ann2snn.set_simulation(model, "fast")
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    return nll.mean(-1)


def seed_line(block: list[dict], seed: int) -> str:
    """As each seed ends (the table waits for all seeds): its gap closed and windows better on each text."""
    parts = [f"{row['text']} {row['gap_closed_pct'][-1]:+.1f}% ({row['windows_better'][-1]}/{row['windows']} windows "
             f"better)" for row in block]
    figures = block[0]["finetune"][-1]
    outcome = "skipped" if figures["skipped"] else "undone" if figures["reverted"] else "kept"
    guard = (f"; guard {figures['guard_fall_nats']:+.4f} ± {figures['guard_fall_noise_nats']:.4f} nats "
             f"({figures['guard_fall_windows_better'][0]}/{figures['guard_fall_windows_better'][1]} better)"
             if figures.get("guard_fall_nats") is not None else "")
    return (f"# T={block[0]['T']} {block[0]['rule']} seed {seed}: {', '.join(parts)}; {outcome}, "
            f"{figures['wall_s']:.0f} s{guard}")


def rows(T, label, ann_nll, before, runs) -> list[dict]:
    """One rule's figures at one T over the seeds run so far: a row per evaluation text."""
    out = []
    for name in before:
        ppl_ann = math.exp(float(ann_nll[name].mean()))
        ppl_before = math.exp(float(before[name].mean()))
        gap = ppl_before - ppl_ann
        # the noise of a change: 2 standard errors of the per-window NLL change, paired, as % of the gap
        noise_pct = max(100 * (math.exp(noise(before[name] - after[name])) - 1) * ppl_before / gap for _, after in runs)
        out.append({"T": T, "rule": label, "text": name, "ppl_ann": ppl_ann, "ppl_snn_before": ppl_before,
                    "noise_pct_of_gap": noise_pct,
                    "gap_closed_pct": [100 * (ppl_before - math.exp(float(after[name].mean()))) / gap for _, after in runs],
                    "windows_better": [int((after[name] < before[name]).sum()) for _, after in runs],
                    "windows": len(before[name]), "finetune": [f for f, _ in runs]})
    return out


def table_line(row: dict) -> str:
    closed, runs = row["gap_closed_pct"], row["finetune"]
    kept = " / ".join(("skipped" if f["skipped"] else "undone" if f["reverted"] else "kept")
                      + (f" ({f['updates_kept']} upd.)" if "updates_kept" in f else "") for f in runs)
    wall = sum(f["wall_s"] for f in runs) / len(runs)
    return (f"| {row['T']} | {row['rule']} | {row['text']} | {row['ppl_ann']:.3f} | {row['ppl_snn_before']:.3f} | "
            f"±{row['noise_pct_of_gap']:.0f}% | {' / '.join(f'{c:+.1f}%' for c in closed)} | "
            f"{sum(closed) / len(closed):+.1f}% | {kept} | {wall:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="qwen2-tiny")
    parser.add_argument("--coding", default="phase", choices=["phase", "rate"])
    parser.add_argument("-T", "--timesteps", default="4,6,8")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tune seeds (batch order); the conversion is fixed")
    parser.add_argument("--rules", default="distill,distill-thresholds,stdp", help=f"of {', '.join(RULES)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stdp-steps", type=int, default=96, help="stdp's steps (12 updates of 8 batches)")
    parser.add_argument("--train", default="train.txt", help="fine-tuning text: a bundled text's name, a file or a folder")
    parser.add_argument("--train-chars", type=int, default=300_000, help="characters of --train used")
    parser.add_argument("--calib-data", default=None, help="calibration text (default: the bundled training text)")
    parser.add_argument("--eval", default="heldout.txt,unseen.txt", help="held-out texts, comma-separated")
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-seq-len", type=int, default=None, help="tokens per fine-tuning window (default --seq-len)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--holdout", type=float, default=None, help="share of the --train windows held out (default finetune's)")
    parser.add_argument("--mix", type=float, default=0.0, help="share of bundled prose among the training windows")
    parser.add_argument("--no-guard", action="store_true", help="no guard text (default finetune's: the bundled probe)")
    parser.add_argument("--options", type=json.loads, default={}, help="distill options as JSON")
    parser.add_argument("--stdp-options", type=json.loads, default={}, help="stdp options as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", HoldoutWarning)
    unknown = set(args.rules.split(",")) - set(RULES)
    if unknown:
        parser.error(f"unknown rule(s) {', '.join(sorted(unknown))}; choose from {', '.join(RULES)}")

    started = time.monotonic()
    ann, tokenizer = ann2snn.load_ann(args.checkpoint)
    train = ["\n\n".join(read_texts(text_path(args.train)))[: args.train_chars]]
    names = args.eval.split(",")
    texts = {name: token_windows(tokenizer, read_texts(text_path(name)), args.seq_len, max_tokens=args.max_eval_tokens)
             for name in names}
    print(f"# {args.checkpoint}: {args.coding} coding, {args.calib_samples} x {args.seq_len} calibration tokens of "
          f"{args.calib_data or 'train.txt'}; fine-tune on {args.train}[:{args.train_chars}]"
          f"{f' with {args.mix:.0%} bundled prose' if args.mix else ''}"
          f"{f', holdout {args.holdout:.0%}' if args.holdout else ''} in batches of {args.batch_size} x "
          f"{args.train_seq_len or args.seq_len} tokens "
          f"(distill {args.steps} steps, stdp {args.stdp_steps}); seeds {args.seeds}; torch {torch.__version__}, "
          f"{args.threads} thread(s)\n", flush=True)
    print("| T | rule | text | ANN ppl | SNN ppl before | noise | gap closed, per seed | mean | kept | wall |")
    print("| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |", flush=True)

    results = []
    for T in [int(t) for t in args.timesteps.split(",")]:
        snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, coding=args.coding, timesteps=T, calib_data=args.calib_data,
                              calib_samples=args.calib_samples, seq_len=args.seq_len, progress=False)
        ann_nll = {name: nll_per_window(snn, w, "ann") for name, w in texts.items()}
        before = {name: nll_per_window(snn, w, "fast") for name, w in texts.items()}
        for label in args.rules.split(","):
            rule, options = RULES[label]
            options = {**options, **(args.options if rule == "distill" else args.stdp_options)}
            steps = args.steps if rule == "distill" else args.stdp_steps
            runs = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                model = copy.deepcopy(snn)
                model.ann2snn = dict(snn.ann2snn)
                figures = finetune(model, tokenizer, train, rule=rule, steps=steps, seed=seed,
                                   batch_size=args.batch_size, seq_len=args.train_seq_len or args.seq_len,
                                   progress=False, holdout=args.holdout, mix=args.mix,
                                   guard=False if args.no_guard else None, **options)
                after = {name: nll_per_window(model, w, "fast") for name, w in texts.items()}
                runs.append((figures, after))
                block = rows(T, label, ann_nll, before, runs)
                print(seed_line(block, seed), file=sys.stderr, flush=True)
                if args.json:  # after each seed, so that a long run stopped early keeps what it measured
                    args.json.write_text(json.dumps(results + block, indent=2, default=str) + "\n")
            for row in block:
                print(table_line(row), flush=True)
            results += block
    print(f"\n{time.monotonic() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
