"""Does plasticity fine-tuning close the gap between a converted SNN and its ANN, on text it never saw?

    python benchmarks/finetune.py [CHECKPOINT] [--coding phase] [-T 3] [--steps 200]
        [--rules distill,distill+weights,stdp] [--train-chars 300000] [--max-eval-tokens 8192]
        [--seq-len 128] [--train-seq-len N] [--batch-size 4] [--lr LR] [--calib-samples 32]
        [--texts heldout.txt,unseen.txt] [--threads 1] [--json OUT.json] [--options JSON]

CHECKPOINT defaults to the embedded "qwen2-tiny"; any checkpoint that
``ann2snn.load_ann`` takes works, e.g. a local Hugging Face folder such as the
real pretrained model that ``benchmarks/real_model.py`` builds:

    python benchmarks/finetune.py ~/.cache/ann2snn/real_model/SmolLM2-135M-Instruct -T 6 --calib-samples 8 \
        --rules distill,distill+weights --steps 60 --batch-size 2 --train-seq-len 64 --max-eval-tokens 2048

(the README's figures; about 19 minutes on 2 shared CPU cores).

The model is converted once (the library defaults: qwen2 recipe, MSE
thresholds, --calib-samples windows of --seq-len tokens of the bundled training
text) at a small T where conversion alone leaves a clear gap (phase coding,
T = 3 for the embedded model), then each rule fine-tunes its own copy of that
SNN on the first --train-chars characters of the bundled training text (Jane
Austen; the embedded model's own training text) in windows of --train-seq-len
tokens (default --seq-len). Figures are measured on text no stage ever saw:
``heldout.txt`` (the end of *Persuasion*, kept out of the model's training and
out of train.txt) and ``unseen.txt`` (Melville), in non-overlapping windows of
--seq-len tokens, at most --max-eval-tokens tokens each.

Per rule and text:
- ANN ppl: the converted model with spiking off, before fine-tuning (the teacher);
- SNN before / after: perplexity of the SNN ("fast" simulation: exactly what the
  spiking simulation accumulates) before and after fine-tuning;
- gap closed: 100·(gap_before − gap_after)/gap_before with gap = PPL(SNN) − PPL(ANN);
- ANN after: the float network of the fine-tuned weights (differs from the ANN
  only for rules that change weights) — a reminder that ``ann2snn eval`` on a
  weight-tuned export compares against these weights, not the original ANN.

Rules: ``distill`` (thresholds only), ``distill+weights`` (thresholds and
Synapsis weights), ``stdp`` (reward-modulated STDP on the weights, homeostatic
thresholds), each with its default rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.calibration.data import bundled_text, read_texts, token_windows  # noqa: E402
from ann2snn.evaluate import logits_over, perplexity  # noqa: E402
from ann2snn.finetune import finetune  # noqa: E402

RULES = {"distill": dict(rule="distill"), "distill+weights": dict(rule="distill", train_weights=True),
         "stdp": dict(rule="stdp")}


def ppl(model, windows, simulation):
    value = perplexity(logits_over(model, windows, simulation), windows)
    ann2snn.set_simulation(model, "fast")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="qwen2-tiny")
    parser.add_argument("--coding", default="phase", choices=["phase", "rate"])
    parser.add_argument("-T", "--timesteps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rules", default="distill,distill+weights,stdp")
    parser.add_argument("--train-chars", type=int, default=300_000)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=None, help="tokens per fine-tuning window (default --seq-len)")
    parser.add_argument("--lr", type=float, default=None, help="the rules' rate (default: each rule's own)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--texts", default="heldout.txt,unseen.txt", help="bundled texts to measure on")
    parser.add_argument("--seed", type=int, default=0, help="the fine-tune's seed (batch order); the conversion is fixed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--options", type=json.loads, default={},
                        help='rule options as JSON for every rule run, e.g. \'{"min_improvement": 0.01}\' (see ann2snn.finetune)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",")
    unknown = set(rules) - set(RULES)
    if unknown:
        parser.error(f"unknown rule(s) {', '.join(sorted(unknown))}; choose from {', '.join(RULES)}")

    started = time.monotonic()
    ann, tokenizer = ann2snn.load_ann(args.checkpoint)
    snn = ann2snn.convert(ann, tokenizer, coding=args.coding, timesteps=args.timesteps, calib_samples=args.calib_samples,
                          seq_len=args.seq_len, progress=False)  # --seed is the fine-tune's: one conversion
    train = [bundled_text("train.txt").read_text(encoding="utf-8")[: args.train_chars]]
    texts = {name: token_windows(tokenizer, read_texts(bundled_text(name)), args.seq_len, max_tokens=args.max_eval_tokens)
             for name in args.texts.split(",")}
    base = {name: {"ann": ppl(snn, w, "ann"), "snn": ppl(snn, w, "fast"), "tokens": int(w[:, 1:].numel())}
            for name, w in texts.items()}
    train_seq_len = args.train_seq_len or args.seq_len
    print(f"# {args.checkpoint}: {args.coding} coding, T={args.timesteps}, {args.calib_samples} x {args.seq_len} "
          f"calibration tokens; fine-tune: {args.steps} steps x {args.batch_size} x {train_seq_len} tokens of "
          f"train.txt[:{args.train_chars}]; converted and measured in {time.monotonic() - started:.0f} s, "
          f"torch {torch.__version__}, {args.threads} thread(s)\n", flush=True)

    results = []
    for label in rules:
        model = copy.deepcopy(snn)
        model.ann2snn = dict(snn.ann2snn)
        figures = finetune(model, tokenizer, train, steps=args.steps, lr=args.lr, seed=args.seed,
                           batch_size=args.batch_size, seq_len=train_seq_len, progress=False, **RULES[label],
                           **args.options)
        for name, windows in texts.items():
            after = ppl(model, windows, "fast")
            # the float network changes only where the weights did
            ann_after = ppl(model, windows, "ann") if figures["mean_abs_dw"] else base[name]["ann"]
            gap_before = base[name]["snn"] - base[name]["ann"]
            gap_after = after - base[name]["ann"]
            results.append({"rule": label, "text": name, "tokens": base[name]["tokens"], "ppl_ann": base[name]["ann"],
                            "ppl_snn_before": base[name]["snn"], "ppl_snn_after": after,
                            "gap_closed_pct": 100 * (gap_before - gap_after) / gap_before, "ppl_ann_after": ann_after,
                            "finetune": figures})

    print("| rule | text (tokens) | ANN ppl | SNN ppl before | SNN ppl after | gap closed | ANN after | "
          "KL in-training held-out | what changed | wall |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for r in results:
        f = r["finetune"]
        changed = f"{f['thresholds_changed']}/{f['thresholds_total']} thresholds (mean {f['mean_threshold_change_pct']:.2f}%)"
        if f.get("mean_abs_dw"):
            changed += f", mean abs dw {f['mean_abs_dw']:.2e} (mean abs w {f['mean_abs_w']:.3f})"
        if f["rule"] == "stdp":
            changed += f", updates kept {f['updates_kept']}/{f['updates_kept'] + f['updates_undone']}"
        if f["reverted"]:
            changed += ", REVERTED"
        print(f"| {r['rule']} | {r['text']} ({r['tokens']}) | {r['ppl_ann']:.3f} | {r['ppl_snn_before']:.3f} | "
              f"{r['ppl_snn_after']:.3f} | {r['gap_closed_pct']:.1f}% | {r['ppl_ann_after']:.3f} | "
              f"{f['kl_before']:.4f} → {f['kl_after']:.4f} | {changed} | {f['wall_s']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
