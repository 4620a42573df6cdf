"""Spikes per token in step simulation: the firing rule and the shared input neurons, on one model.

    python benchmarks/spike_counts.py CHECKPOINT [--data FILE] [--timesteps 4,6,8] [--tokens 256] [--seq-len 128]

CHECKPOINT is a checkpoint folder or "qwen2-tiny". The model is converted with
the default recipe at each T and run in ``step`` simulation over the first
--tokens tokens of --data (default: the bundled held-out text); a hook on every
`SignedNeuron` counts the nonzero spikes of the train it fires. Columns:

- ``½·w_t, one neuron per Synapsis``: what the neurons fired before this rule
  and before sharing — the same inputs re-fired here under the old rule
  (θ_t = ½·w_t), counted once per reader of a shared neuron (each Synapsis
  had its own);
- ``¾·w_t, one per Synapsis``: the minimal-weight rule, still counted per reader;
- ``¾·w_t, shared``: as the SNN runs now — q/k/v and gate/up fire once.

The spiking head's input neuron is left out of all three (it is new; its own
column says what it adds). Every column carries the same values (the counts
are equal, tested); only the number of spikes differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ann2snn  # noqa: E402
from ann2snn.calibration.data import bundled_text, read_texts, token_windows  # noqa: E402
from ann2snn.modules.neuron import SignedNeuron, set_simulation  # noqa: E402


def half_rule_spikes(u: torch.Tensor, weights: list[float]) -> int:
    """Nonzero spikes of the earlier rule (fire at ±½·w_t) on membranes u (in units of Δ)."""
    v, spikes = u.double().clone(), 0
    for w in weights:
        if w <= 0:
            continue
        s = (v >= w / 2).double() - (v < -w / 2).double()
        v -= s * w
        spikes += int(s.count_nonzero())
    return spikes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(bundled_text("heldout.txt")))
    p.add_argument("--timesteps", default="4,6,8")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| T | ½·w_t, one neuron per Synapsis | ¾·w_t, one per Synapsis | ¾·w_t, shared | change | spiking head adds |")
    print("|---|---|---|---|---|---|")
    for t in [int(x) for x in args.timesteps.split(",")]:
        ann, tokenizer = ann2snn.load_ann(args.checkpoint, dtype=torch.float32)
        windows = token_windows(tokenizer, read_texts(args.data), args.seq_len, samples=None, max_tokens=args.tokens)
        snn = ann2snn.convert(ann, tokenizer, timesteps=t, progress=False)
        counts = {"half": 0, "per_reader": 0, "shared": 0, "head": 0}

        def count(module, inputs, train, name):
            fired = int(train.spikes.count_nonzero())
            if name == "lm_head.neuron":
                counts["head"] += fired
                return
            u = inputs[0].detach() / module.current_delta(inputs[0])
            counts["half"] += half_rule_spikes(u, train.weights.tolist()) * module.readers
            counts["per_reader"] += fired * module.readers
            counts["shared"] += fired

        for name, module in snn.named_modules():
            if isinstance(module, SignedNeuron):
                module.register_forward_hook(lambda m, i, out, name=name: count(m, i, out, name))
        set_simulation(snn, "step")
        with torch.no_grad():
            for window in windows:
                snn(input_ids=window[None], use_cache=False)
        n = windows.numel()
        half, per_reader, shared = (counts[k] / n for k in ("half", "per_reader", "shared"))
        print(f"| {t} | {half:,.0f} | {per_reader:,.0f} | {shared:,.0f} | {100 * (shared / half - 1):+.1f} % "
              f"({100 * (per_reader / half - 1):+.1f} % rule, {100 * (shared / per_reader - 1):+.1f} % sharing) | "
              f"{counts['head'] / n:,.0f} |", flush=True)
    print(f"\nspikes per token; {n} tokens of {Path(args.data).name}, step simulation, default recipe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
