"""Thresholds and outlier handling at each T: the quantisation bound of each setting on one model.

    python benchmarks/outliers.py CHECKPOINT --data FILE [--timesteps 4,6,8,10,16,32]
        [--settings default,legacy,sink] [--max-tokens 2048] [--seq-len 128] [--calib-samples 32]

CHECKPOINT is a checkpoint folder or "qwen2-tiny"; for a real pretrained model
see `benchmarks/real_model.py`. Calibration runs once per outlier handling
(the statistics do not depend on T) on the bundled text; every row is then the
``fast`` simulation — the fake-quantised ANN at the coding's levels, which the
step simulation equals (tests/test_convert.py, tests/test_attention_sink.py) —
scored on the same windows of --data against the original ANN. Settings:

- ``default``: what ``ann2snn convert MODEL --timesteps T`` picks (phase code,
  no outlier handling, threshold rule and headroom from the recipe's level table);
- ``legacy``: the default before the level table (MSE clips, no headroom);
- ``sink``: the default thresholds with the attention sink (`ann2snn.attention_sink`);
- ``sink-mse``: the sink with MSE clips and no headroom;
- ``rotate``: the default thresholds after rotation and smoothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ann2snn  # noqa: E402
from ann2snn.calibration.data import read_texts, token_windows  # noqa: E402
from ann2snn.convert import calibrate  # noqa: E402
from ann2snn.evaluate import logits_over, perplexity  # noqa: E402
from ann2snn.recipes import get_recipe  # noqa: E402

SETTINGS = {  # name: (outliers, threshold, headroom); None = the recipe's default
    "default": (None, None, None),
    "legacy": ((), "mse", 1.0),
    "sink": (("sink",), None, None),
    "sink-mse": (("sink",), "mse", 1.0),
    "rotate": (("rotate", "smooth"), None, None),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", default="4,6,8,10,16,32")
    p.add_argument("--settings", default="default,legacy,sink")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    ann, tokenizer = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
    windows = token_windows(tokenizer, read_texts(args.data), args.seq_len, samples=None, max_tokens=args.max_tokens)
    ppl_ann = perplexity(logits_over(ann, windows, "ann"), windows)
    print(f"{args.checkpoint}: ANN perplexity {ppl_ann:.3f} on {windows.numel()} tokens of {Path(args.data).name}; "
          f"calibration {args.calib_samples} × {args.seq_len} tokens of the bundled text\n")
    print("| T | setting | outliers | thresholds | PPL ratio (bound) | top-1 |")
    print("|---|---|---|---|---|---|")
    calibrated = {}
    rows = [(t, name) for name in args.settings.split(",") for t in timesteps]
    for t, name in sorted(rows):
        outliers, threshold, headroom = SETTINGS[name]
        recipe = get_recipe("qwen2").with_options(outliers=outliers)
        if recipe.outliers not in calibrated:
            model = copy.deepcopy(ann)
            calibrated[recipe.outliers] = (model, *calibrate(model, tokenizer, recipe, None, args.calib_samples, args.seq_len, 0,
                                                             progress=False))
        model, statistics, info = calibrated[recipe.outliers]
        start = time.time()
        snn = ann2snn.convert(copy.deepcopy(model), tokenizer, timesteps=t, outliers=outliers, threshold=threshold, headroom=headroom,
                              statistics=statistics, calibration_info=info, progress=False)
        logits = logits_over(snn, windows, "fast")
        summary = snn.ann2snn["recipe"]
        top1 = (logits[:, :-1].argmax(-1) == logits_over(ann, windows, "ann")[:, :-1].argmax(-1)).float().mean().item()
        print(f"| {t} | {name} | {','.join(summary['outliers']) or 'none'} | {summary['threshold']} ×{summary['headroom']:g} | "
              f"{perplexity(logits, windows) / ppl_ann:.4f} | {100 * top1:.1f} % |", flush=True)
        del snn, logits
        print(f"<!-- {time.time() - start:.0f} s -->", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
