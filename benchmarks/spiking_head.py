"""Spike-driven lm_head: PPL ratio with the head as a float matmul and as a Synapsis, same statistics.

    python benchmarks/spiking_head.py CHECKPOINT --data FILE[,FILE…] [--timesteps 4,6,8]
        [--max-tokens 2048] [--seq-len 128] [--calib-samples 32] [--head-thresholds mse,percentile]

CHECKPOINT is a checkpoint folder or "qwen2-tiny". Calibration runs once, with
the head's input site observed (the final norm's output); both conversions
then use the same statistics, so the rows differ only in the head. Each row is
the ``fast`` simulation (which the step simulation equals, tests/test_convert.py)
scored on the same windows of each --data file against the original ANN.
--head-thresholds adds rows with another threshold rule for the head's neuron only.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ann2snn  # noqa: E402
from ann2snn.calibration.data import read_texts, token_windows  # noqa: E402
from ann2snn.convert import calibrate  # noqa: E402
from ann2snn.evaluate import logits_over, perplexity  # noqa: E402
from ann2snn.recipes import Rule, get_recipe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="comma-separated text files")
    p.add_argument("--timesteps", default="4,6,8")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--head-thresholds", default="", help="comma-separated threshold rules for the head alone")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ann, tokenizer = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
    head = get_recipe("qwen2").with_options(spiking_head=True)
    statistics, info = calibrate(copy.deepcopy(ann), tokenizer, head, None, args.calib_samples, args.seq_len, 0, progress=False)
    files = args.data.split(",")
    windows = {f: token_windows(tokenizer, read_texts(f), args.seq_len, samples=None, max_tokens=args.max_tokens) for f in files}
    ppl_ann = {f: perplexity(logits_over(ann, w, "ann"), w) for f, w in windows.items()}
    print(f"{args.checkpoint}: " + "; ".join(f"ANN perplexity {ppl_ann[f]:.3f} on {windows[f].numel()} tokens of {Path(f).name}"
                                              for f in files) + "\n")
    print("| T | lm_head | " + " | ".join(f"PPL ratio {Path(f).stem}" for f in files) + " |")
    print("|---|---|" + "---|" * len(files))
    variants = [("float", head.with_options(spiking_head=False)), ("Synapsis", head)]
    for rule in filter(None, args.head_thresholds.split(",")):
        variants.append((f"Synapsis, {rule}", head.with_options(head_rules=(Rule(r"lm_head", "Linear", "synapsis", threshold=rule),))))
    for t in [int(x) for x in args.timesteps.split(",")]:
        for label, recipe in variants:
            snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, recipe=recipe, timesteps=t,
                                  statistics=statistics, calibration_info=info, progress=False)
            ratios = [perplexity(logits_over(snn, windows[f], "fast"), windows[f]) / ppl_ann[f] for f in files]
            print(f"| {t} | {label} | " + " | ".join(f"{r:.4f}" for r in ratios) + " |", flush=True)
            del snn
    return 0


if __name__ == "__main__":
    sys.exit(main())
