"""Per-site levels against uniform ones: SNN/ANN energy (view i) and PPL ratio on held-out text, per budget.

    python benchmarks/levels.py MODEL [--timesteps 8] [--budgets 1.01,1.0125] [--uniform 8]
        [--data heldout.txt,unseen.txt] [--max-tokens 1024] [--calib-samples 32]

MODEL is a checkpoint folder or "qwen2-tiny". It calibrates once (on the bundled
text, --calib-samples windows of 128 tokens, as `ann2snn convert` does), then
converts at --timesteps with `--levels auto --max-ppl-ratio R` for each budget R
and with uniform levels at each T of --uniform, and runs `ann2snn.report.build_report`
(the step simulation, as `ann2snn report`) over the same windows of each --data
file (bundled corpus names or paths). Each row: what the allocation measured on
the calibration windows and on the probe's, where the model predicts the probe
(PPL ratio, the KL it added against the KL it was allowed, nats per token), the
mean T over sites, then energy @ PPL ratio per text.
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
from ann2snn.calibration.data import bundled_text, read_texts, token_windows  # noqa: E402
from ann2snn.convert import calibrate  # noqa: E402
from ann2snn.report import build_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--timesteps", type=int, default=8)
    p.add_argument("--budgets", default="1.01,1.0125", help="--max-ppl-ratio values, comma-separated")
    p.add_argument("--uniform", default="", help="T values converted with uniform levels, comma-separated")
    p.add_argument("--data", default="heldout.txt,unseen.txt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--calib-samples", type=int, default=32)
    args = p.parse_args()

    ann, tokenizer = ann2snn.load_ann(args.model)
    statistics, info = calibrate(ann, tokenizer, calib_samples=args.calib_samples, progress=False)
    texts = {}
    for name in args.data.split(","):
        path = bundled_text(name) if not Path(name).exists() else Path(name)
        texts[name] = token_windows(tokenizer, read_texts(str(path)), 128, max_tokens=args.max_tokens)
    settings = [(f"auto ≤ {b}", dict(max_ppl_ratio=float(b), timesteps=args.timesteps))
                for b in args.budgets.split(",") if b]
    settings += [(f"uniform T={t}", dict(levels="uniform", timesteps=int(t))) for t in args.uniform.split(",") if t]
    print("| levels | per text measured (calibration, probe): PPL ratio, KL added ≤ allowed; mean T | convert s | "
          + " | ".join(f"{name}: energy @ PPL ratio" for name in texts) + " |")
    print("|---|---|---|" + "---|" * len(texts))
    for label, options in settings:
        started = time.monotonic()
        snn = ann2snn.convert(copy.deepcopy(ann), statistics=statistics, calibration_info=info, progress=False, **options)
        seconds = time.monotonic() - started
        found = snn.ann2snn["allocation"]
        measured = "; ".join(f"{name} {text['measured_ppl_ratio']:.4f}, {text['added_kl']:.4f} ≤ {text['allowed_kl']:.4f}"
                             for name, text in (("calibration", found), ("probe", found.get("probe"))) if text
                             ) + f"; {found['mean_timesteps']:.2f}" if found else "–"
        cells = []
        for windows in texts.values():
            with torch.no_grad():
                run = build_report(snn, windows, progress=False)
            cells.append(f"{run['energy']['snn_over_ann']:.3f} @ {run['ppl_snn'] / run['ppl_ann']:.4f}")
        print(f"| {label} | {measured} | {seconds:.0f} | " + " | ".join(cells) + " |", flush=True)
        del snn


if __name__ == "__main__":
    main()
