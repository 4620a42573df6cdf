"""The spiking head's window: the head at T (before) against the head at its own measured window (`head_steps` auto).

    python benchmarks/head_window.py CHECKPOINT --data FILE[,FILE…] [--timesteps 4,6,8] [--calib-data FILE]
        [--max-tokens 2048] [--report-tokens 256] [--threads 1]

CHECKPOINT is a checkpoint folder or "qwen2-tiny". Calibration runs once (32 × 128
tokens of --calib-data, default the bundled text); every conversion reuses its
statistics, so the two rows of a T differ only in the head's window. Each row is the
bound (the ``fast`` simulation, which the step simulation equals) on the first
--max-tokens tokens of each --data file against the ANN (`outliers.evaluation_sets`,
the same windows as `ann2snn eval --max-tokens`), and, with --report-tokens, the
report's SNN/ANN energy (view i, `ann2snn report`: the step simulation, counted as
it fires) on that many tokens of the first file. "head T" is the head's window and
"divergence" what `calibration.head` measured on the calibration windows, per window tried.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outliers import evaluation_sets  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.convert import calibrate  # noqa: E402
from ann2snn.evaluate import logits_over, perplexity  # noqa: E402
from ann2snn.report import build_report  # noqa: E402

HEADS = ((0, "at T (before)"), ("auto", "own window (auto)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="comma-separated text files or folders")
    p.add_argument("--calib-data", default=None, help="calibration text (default: the bundled English text)")
    p.add_argument("--timesteps", default="4,6,8")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--report-tokens", type=int, default=256, help="tokens of the first --data for the energy (0: none)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    ann, tokenizer = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
    evaluations = evaluation_sets(ann, tokenizer, args.data.split(","), 128, args.max_tokens)
    report_windows = next(iter(evaluations.values()))[0][: max(args.report_tokens // 128, 1)]
    # the ANN itself: the default recipe folds no outlier transform into it, and each conversion takes a copy
    statistics, info = calibrate(ann, tokenizer, "qwen2", args.calib_data, 32, 128, 0, progress=False)
    print(f"{args.checkpoint}, calibrated on {args.calib_data or 'the bundled text'} (32 × 128 tokens); "
          + "; ".join(f"{data}: {w[:, 1:].numel()} predicted tokens, ANN perplexity {ppl:.3f}"
                      for data, (w, _, ppl) in evaluations.items()) + "\n")
    energy = f" SNN/ANN energy (i), {report_windows.numel()} tokens |" if args.report_tokens else ""
    print("| T | lm_head | head T | divergence by head T (calibration) | " + " | ".join(f"PPL ratio {d}" for d in evaluations)
          + f" |{energy}")
    print("|---|---|---|---|" + "---|" * len(evaluations) + ("---|" if energy else ""))
    for t in [int(x) for x in args.timesteps.split(",")]:
        for head_steps, label in HEADS:
            snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, timesteps=t, head_steps=head_steps,
                                  statistics=statistics, calibration_info=info, progress=False)
            found = snn.ann2snn["head"]["lm_head"]
            measured = ", ".join(f"{k}: {v:.4f}" for k, v in found.get("divergence", {}).items())
            ratios = [perplexity(logits_over(snn, w, "fast"), w) / ppl for w, _, ppl in evaluations.values()]
            row = (f"| {t} | {label} | {found['timesteps']} | {measured} | "
                   + " | ".join(f"{r:.4f}" for r in ratios) + " |")
            if args.report_tokens:
                row += f" {build_report(snn, report_windows, progress=False)['energy']['snn_over_ann']:.3f} |"
            print(row, flush=True)
            del snn
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
