"""Thresholds and outlier handling at each T: the quantisation bound of each setting on one model.

    python benchmarks/outliers.py CHECKPOINT --data FILE[,FILE...] [--calib-data FILE] [--timesteps 4,6,8,10,16,32]
        [--settings default,legacy,sink] [--max-tokens 2048] [--seq-len 128] [--calib-samples 32]

CHECKPOINT is a checkpoint folder or "qwen2-tiny"; for a real pretrained model
see `benchmarks/real_model.py`. Calibration runs once per outlier handling
(the statistics do not depend on T) on --calib-data (default: the bundled
text; a file or a folder of .txt files, as for `ann2snn convert`); every row is then the
``fast`` simulation — the fake-quantised ANN at the coding's levels, which the
step simulation equals (tests/test_convert.py, tests/test_attention_sink.py) —
scored on the same windows of each --data (a file or folder of .txt files; several,
comma-separated) against the original ANN. Settings:

- ``default``: what ``ann2snn convert MODEL --timesteps T`` picks (phase code,
  no outlier handling, threshold rule and headroom from the recipe's level table,
  range steps "auto");
- ``no-range``: the default without range steps (the default before them);
- ``legacy``: the default before the level table (MSE clips, no headroom, no range steps);
- ``sink``: the default thresholds with the attention sink (`ann2snn.attention_sink`);
- ``sink-mse``: the sink with MSE clips and no headroom;
- ``rotate``: the default thresholds after rotation and smoothing.
"""

from __future__ import annotations

import argparse
import copy
import math
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

SETTINGS = {  # name: (outliers, threshold, headroom, range steps); None = the recipe's default
    "default": (None, None, None, None),
    "no-range": (None, None, None, 0),
    "legacy": ((), "mse", 1.0, 0),
    "sink": (("sink",), None, None, None),
    "sink-mse": (("sink",), "mse", 1.0, 0),
    "rotate": (("rotate", "smooth"), None, None, None),
}


def evaluation_sets(ann, tokenizer, data: list[str], seq_len: int, max_tokens: int) -> dict[str, tuple]:
    """Per --data path, by its name: (the token windows, the ANN's logits over them, the ANN's perplexity)."""
    evaluations = {}
    for path in data:
        windows = token_windows(tokenizer, read_texts(path), seq_len, samples=None, max_tokens=max_tokens)
        reference = logits_over(ann, windows, "ann")
        evaluations[Path(path).name] = (windows, reference, perplexity(reference, windows))
    return evaluations


def token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Each predicted token's negative log-likelihood, flattened."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                             windows[:, 1:].reshape(-1), reduction="none")


def bound_rows(ann, tokenizer, evaluations: dict, timesteps: list[int], settings: list[str], calib_data, calib_samples: int,
               seq_len: int, step_data: str | None = None, step_timesteps: frozenset[int] = frozenset()):
    """One dict per (T, setting, evaluation set): the setting's conversion at T, scored by its bound (``fast``).

    Calibration runs once per outlier handling; every conversion reuses its statistics, which do not depend
    on T, threshold rule, headroom or range steps. At each T of `step_timesteps`, on the evaluation set
    named `step_data`, the step simulation runs too: "step_ratio" is its perplexity over the bound's, "step_se" that ratio's standard
    error from the paired per-token differences (both are one realisation of the spikes; in float32 they part
    where a rounding flips a level, which later layers amplify)."""
    calibrated = {}
    for t, name in sorted((t, name) for name in settings for t in timesteps):
        outliers, threshold, headroom, range_steps = SETTINGS[name]
        recipe = get_recipe("qwen2").with_options(outliers=outliers)
        if recipe.outliers not in calibrated:
            model = copy.deepcopy(ann)
            calibrated[recipe.outliers] = (model, *calibrate(model, tokenizer, recipe, calib_data, calib_samples, seq_len, 0,
                                                             progress=False))
        model, statistics, info = calibrated[recipe.outliers]
        snn = ann2snn.convert(copy.deepcopy(model), tokenizer, timesteps=t, outliers=outliers, threshold=threshold, headroom=headroom,
                              range_steps=range_steps, statistics=statistics, calibration_info=info, progress=False)
        for data, (windows, reference, ppl_ann) in evaluations.items():
            start = time.time()
            logits = logits_over(snn, windows, "fast")
            top1 = (logits[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1)).float().mean().item()
            row = {"timesteps": t, "setting": name, "recipe": snn.ann2snn["recipe"], "range_steps": snn.ann2snn["range_steps"],
                   "data": data, "ratio": perplexity(logits, windows) / ppl_ann, "top1": top1}
            if data == step_data and t in step_timesteps:
                difference = token_nll(logits_over(snn, windows, "step"), windows) - token_nll(logits, windows)
                row["step_ratio"] = math.exp(difference.mean().item())
                row["step_se"] = difference.std().item() / math.sqrt(difference.numel())
            row["seconds"] = time.time() - start
            yield row
            del logits
        del snn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--calib-data", default=None, help="calibration text (default: the bundled English text)")
    p.add_argument("--timesteps", default="4,6,8,10,16,32")
    p.add_argument("--settings", default="default,legacy,sink")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ann, tokenizer = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
    evaluations = evaluation_sets(ann, tokenizer, args.data.split(","), args.seq_len, args.max_tokens)
    for data, (windows, _, ppl_ann) in evaluations.items():
        print(f"{args.checkpoint}: ANN perplexity {ppl_ann:.3f} on {windows[:, 1:].numel()} predicted tokens of {data}")
    print(f"calibration {args.calib_samples} × {args.seq_len} tokens of {args.calib_data or 'the bundled text'}\n")
    print("| T | setting | outliers | thresholds | range steps (sites, most) | evaluated on | PPL ratio (bound) | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in bound_rows(ann, tokenizer, evaluations, [int(t) for t in args.timesteps.split(",")], args.settings.split(","),
                          args.calib_data, args.calib_samples, args.seq_len):
        summary, ranged = row["recipe"], row["range_steps"]
        print(f"| {row['timesteps']} | {row['setting']} | {','.join(summary['outliers']) or 'none'} | "
              f"{summary['threshold']} ×{summary['headroom']:g} | "
              f"{summary['range_steps']} ({len(ranged)} sites, +{max(ranged.values(), default=0)}) | {row['data']} | "
              f"{row['ratio']:.4f} | {100 * row['top1']:.1f} % |", flush=True)
        print(f"<!-- {row['seconds']:.0f} s -->", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
