"""How close each ANN→SNN conversion stays to its ANN, at each number of time steps T.

    python benchmarks/fidelity.py CHECKPOINT --data FILE [--calib-data FILE]
        [--timesteps 4,6,8,10,16,32,64] [--seq-len 128] [--max-tokens 8192]
        [--calib-samples 32] [--simulation fast|step] [--methods phase,rate,spikingjelly,braintransformers]
        [--markdown OUT.md]

CHECKPOINT is a Hugging Face checkpoint folder or "qwen2-tiny" (the embedded
model). One run scores every method on the same token windows of --data
(non-overlapping windows of --seq-len tokens, at most --max-tokens tokens), and
prints one markdown table (--methods: which of the methods below; default all). Per row:

- PPL: exp of the mean next-token cross-entropy over every position of every
  window (as `ann2snn.evaluate.perplexity`); "PPL / ANN" is its ratio to the
  ANN's PPL, computed once.
- top-1: share of positions (the last of each window excluded, as
  `ann2snn.evaluate.compare`) where the method's argmax logit equals the ANN's.
- spike-driven MACs: see below.
- wall: seconds for the method's conversion (plus its own calibration for
  spikingjelly; ann2snn's calibration runs once, reported in the header) and its
  evaluation pass.

Methods, for each T:

1. ann2snn ``qwen2`` recipe, phase coding, the recipe's default threshold rule and
   headroom at that T (the library default; the row names them)
   — a "bound" row (``fast`` simulation: the fake-quantised ANN at the coding's
   levels, i.e. the quantisation bound) and an "SNN" row (``--simulation``;
   by default ``step`` — the full step-by-step spiking simulation — for T ≤ 16
   and ``fast`` above, where the SNN row repeats the bound, which the step
   simulation equals to float tolerance). Phase coding carries weight on at
   most 23 steps; at larger T the later steps stay silent.
2. ann2snn ``qwen2`` recipe, rate coding with MSE thresholds, and rate coding
   with max thresholds (bound and SNN rows alike).
3. spikingjelly 2.0's own Qwen2 recipe
   (``spikingjelly.activation_based.ann2snn.recipes.qwen2``):
   ``Qwen2SNNConfig(time_steps=T, calibration_levels=T)``, calibrated on the
   same calibration windows, run in its default ``signed_if`` encoding (its
   spiking path). It materialises [T, B, S, H] sequences, so it runs with small
   batches, and a T whose projected time exceeds --max-method-seconds (or whose
   tensors would not fit in memory) is marked "skipped: time/memory".
Once, outside the T loop:
4. ann2snn ``braintransformers`` recipe (the BrainTransformers baseline), at its
   own T = 127, ``fast`` simulation. Its neurons rescale per call over the whole
   batch, so its result depends on the batch size (printed).

Run time. The step simulation costs about T times the fast one, and
spikingjelly materialises T copies of every activation. On a 2-CPU machine
shared with other jobs (load ≈ 7), the defaults on qwen2-tiny took 11 min and
--max-tokens 2048 took 4 min. Threads default to the CPUs left idle (--threads):
an oversubscribed CPU makes the step simulation 5–20× slower.

Spike-driven coverage. Per decoder layer and window of S tokens, with hidden
size H, intermediate size I, n_q query heads, n_kv key/value heads and head
dimension d, the multiply-accumulates (MACs) are

    q_proj  S·H·n_q·d        k_proj, v_proj  S·H·n_kv·d each      o_proj  S·n_q·d·H
    gate_proj, up_proj, down_proj  S·H·I each
    QKᵀ     n_q·d·S(S+1)/2   weights·V  n_q·d·S(S+1)/2   (causal: only unmasked pairs)

and every layer has the same counts, so the coverage of a method is

    coverage = Σ_{op whose operands are all spike trains} MACs(op) / Σ_{all ops above} MACs(op)

- ann2snn ``qwen2``: every op above → 100 %.
- spikingjelly Qwen2: down_proj (its "mlp" encoder feeds down_proj) + QKᵀ (its
  "query" and "key" encoders); its weights·V has a float softmax operand, and
  the inputs of q/k/v/o/gate/up are float (RMSNorm / attention outputs). (Its
  TDScaledDotProductAttention evaluates QKᵀ on the running sums of the q and k
  spike trains; the count above is by operand, as for the other methods.)
- ``braintransformers``: all decoder Linear layers (q/k/v/o/gate/up/down; each
  input is quantised by its per-call neuron); both attention products are float.
- the ANN: 0 %.
Embedding, lm_head, norms, residuals, softmax and gate ⊙ up are not MACs of
the decoder's Linear layers or attention products and are left out of both sums.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ann2snn  # noqa: E402
from ann2snn.recipes import get_recipe  # noqa: E402
from ann2snn.calibration.data import read_texts, token_windows  # noqa: E402
from ann2snn.errors import Ann2SnnError  # noqa: E402

DEFAULT_TIMESTEPS = "4,6,8,10,16,32,64"
METHODS = ("phase", "rate", "spikingjelly", "braintransformers")
STEP_UP_TO = 16  # default --simulation: "step" for T ≤ 16, "fast" above
BRAINTRANSFORMERS_T = 127
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRODUCTS = ("qk", "pv")
SPIKE_DRIVEN = {
    "ann": (),
    "ann2snn": LINEARS + PRODUCTS,
    "spikingjelly": ("down_proj", "qk"),
    "braintransformers": LINEARS,
}


# ----------------------------------------------------------------------------- MACs


def layer_macs(config, seq_len: int) -> dict[str, int]:
    """MACs of one decoder layer over one window of `seq_len` tokens (see the module docstring)."""
    h = config.hidden_size
    i = config.intermediate_size
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    d = getattr(config, "head_dim", None) or h // n_q
    s = seq_len
    pairs = s * (s + 1) // 2
    return {
        "q_proj": s * h * n_q * d,
        "k_proj": s * h * n_kv * d,
        "v_proj": s * h * n_kv * d,
        "o_proj": s * n_q * d * h,
        "gate_proj": s * h * i,
        "up_proj": s * h * i,
        "down_proj": s * i * h,
        "qk": n_q * d * pairs,
        "pv": n_q * d * pairs,
    }


def coverage(macs: dict[str, int], method: str) -> float:
    return sum(macs[op] for op in SPIKE_DRIVEN[method]) / sum(macs.values())


def unconverted(model, recipe: str) -> list[str]:
    """Decoder modules the recipe should have replaced but did not (so its coverage would be overstated)."""
    expected_act = {"qwen2": "SNNSiLU", "braintransformers": "StaircaseSiLU"}[recipe]
    problems = []
    for index, layer in enumerate(model.model.layers):
        for block in ("self_attn", "mlp"):
            for name, child in getattr(layer, block).named_children():
                if isinstance(child, torch.nn.Linear):
                    problems.append(f"layers.{index}.{block}.{name} is still a Linear")
        if type(layer.mlp.act_fn).__name__ != expected_act:
            problems.append(f"layers.{index}.mlp.act_fn is {type(layer.mlp.act_fn).__name__}, not {expected_act}")
        if recipe == "qwen2" and getattr(layer.self_attn, "snn", None) is None:
            problems.append(f"layers.{index}.self_attn has no spiking attention")
    return problems


def structure_note(model, recipe: str) -> str:
    problems = unconverted(model, recipe)
    return f"WARNING: {len(problems)} module(s) not converted, e.g. {problems[0]}" if problems else ""


# ----------------------------------------------------------------------------- spikingjelly


def spikingjelly_qwen2(ann, calib_windows: torch.Tensor, timesteps: int, batch_size: int):
    """spikingjelly 2.0's Qwen2 recipe at T (method 3): `Qwen2SNNConfig(time_steps=T, calibration_levels=T)`,
    calibrated on `calib_windows` in batches of `batch_size`; a `Qwen2SNNModel` in eval mode, its encoders'
    statistics off. `ann` is left as it is."""
    from spikingjelly.activation_based.ann2snn.recipes.qwen2 import Qwen2SNNConfig, Qwen2SNNModel, calibrate_qwen2_snn

    source = copy.deepcopy(ann).eval()
    cfg = Qwen2SNNConfig(time_steps=timesteps, calibration_levels=timesteps)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib_windows.split(batch_size)]
    with torch.no_grad():
        calib = calibrate_qwen2_snn(source, batches, cfg)
        snn = Qwen2SNNModel(source, calib, cfg).eval()
    snn.set_collect_statistics(False)  # documented not to change spikes or membranes; saves time
    return snn


def spikingjelly_forward(snn):
    """ids [B, L] → logits; its TD modules and IF neurons keep state between calls, so each call resets them."""
    from spikingjelly.activation_based import functional as sj_functional

    def forward(ids):
        sj_functional.reset_net(snn)
        return snn(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return forward


# ----------------------------------------------------------------------------- scoring


class Skip(Exception):
    """The method would take too long (or too much memory) on this machine."""


@dataclass
class Score:
    ppl: float
    top1: float
    token_nll: torch.Tensor  # [N, L-1], kept to compare the SNN with its bound
    seconds: float


class Scorer:
    """Scores a forward function (ids [B, L] → logits [B, L, V]) on fixed windows, against the ANN's argmax."""

    def __init__(self, windows: torch.Tensor, progress: bool):
        self.windows = windows
        self.progress = progress
        self.ann_argmax: torch.Tensor | None = None

    @torch.no_grad()
    def score(self, forward, batch_size: int, label: str, budget_s: float | None = None) -> Score:
        start = time.perf_counter()
        nll, argmax = [], []
        n = self.windows.shape[0]
        batches = list(range(0, n, batch_size))
        for index, first in enumerate(batches):
            ids = self.windows[first:first + batch_size]
            logits = forward(ids).float()
            vocab = logits.shape[-1]
            nll.append(F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
                       .reshape(ids.shape[0], -1))
            argmax.append(logits[:, :-1].argmax(-1))
            elapsed = time.perf_counter() - start
            if index == 0 and budget_s is not None:
                projected = elapsed * len(batches)
                if projected > budget_s:
                    raise Skip(f"projected {projected:.0f} s > {budget_s:.0f} s")
            if self.progress:
                print(f"\r    {label}: batch {index + 1}/{len(batches)} ({elapsed:.1f} s)", end="", file=sys.stderr, flush=True)
        if self.progress:
            print(file=sys.stderr, flush=True)
        token_nll = torch.cat(nll)
        argmax = torch.cat(argmax)
        if self.ann_argmax is None:
            self.ann_argmax = argmax
        mean_nll = token_nll.mean().item()
        ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else float("inf" if mean_nll == mean_nll else "nan")
        top1 = (argmax == self.ann_argmax).float().mean().item()
        return Score(ppl, top1, token_nll, time.perf_counter() - start)


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    timesteps: str
    method: str
    variant: str
    simulation: str
    cover: float | None
    score: Score | None = None
    wall: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def fmt_row(row: Row, ann_ppl: float) -> str:
    if row.score is None:
        ppl = ratio = top1 = "—"
    else:
        ppl = f"{row.score.ppl:.3f}"
        ratio = f"{row.score.ppl / ann_ppl:.4f}"
        top1 = f"{100 * row.score.top1:.2f} %"
    cover = "—" if row.cover is None else f"{100 * row.cover:.1f} %"
    wall = "—" if row.wall is None else f"{row.wall:.1f}"
    return f"| {row.timesteps} | {row.method} | {row.variant} | {row.simulation} | {ppl} | {ratio} | {top1} | {cover} | {wall} | {row.note} |"


HEADER = ("| T | method | coding / thresholds | simulation | PPL | PPL / ANN | top-1 agree | spike-driven MACs | wall (s) | note |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---|")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help='Hugging Face checkpoint folder, or "qwen2-tiny"')
    p.add_argument("--data", required=True, help="evaluation text (.txt, .jsonl or folder of .txt)")
    p.add_argument("--calib-data", default=None, help="calibration text (default: ann2snn's bundled train.txt)")
    p.add_argument("--timesteps", default=DEFAULT_TIMESTEPS, help=f"comma-separated T values (default {DEFAULT_TIMESTEPS})")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens read from --data (bounds the run time)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--simulation", choices=("fast", "step"), default=None,
                   help=f"simulation of the ann2snn SNN rows (default: step for T ≤ {STEP_UP_TO}, else fast)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward for the ann2snn rows and the ANN")
    p.add_argument("--sj-batch-size", type=int, default=None, help="windows per forward for spikingjelly (default: max(1, 32 // T), at most 4)")
    p.add_argument("--max-method-seconds", type=float, default=180.0,
                   help="skip spikingjelly at a T whose projected evaluation exceeds this (default 180)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads (default auto: the CPUs not already busy, at least 1; "
                        "oversubscribed threads slow the step simulation by 5-20x on a loaded machine)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods to run, of {','.join(METHODS)} (default all; the ANN always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="also write the report to this markdown file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    try:
        args.timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError:
        p.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if args.threads != "auto" and (not args.threads.isdigit() or int(args.threads) <= 0):
        p.error(f"--threads must be a positive integer or auto, got {args.threads!r}")
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods takes names from {','.join(METHODS)}, got {','.join(args.methods)!r}")
    if not args.timesteps or min(args.timesteps) <= 0:
        p.error("--timesteps needs positive integers")
    for name in ("seq_len", "max_tokens", "calib_samples", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def library_version() -> str:
    """ann2snn's version and, in a git checkout, its commit (+ "dirty" when files differ from it)."""
    import subprocess

    root = Path(ann2snn.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "ann2snn"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ann2snn.__version__
    return f"{ann2snn.__version__} @ {commit}{' + uncommitted changes' if dirty else ''}" if commit else ann2snn.__version__


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def spikingjelly_peak_bytes(config, timesteps: int, batch: int, seq_len: int, element_bytes: int = 4) -> int:
    """A rough peak for one forward of spikingjelly's Qwen2SNNModel: a few [T, B, S, max(H, I)] sequences plus [T, B, n_q, S, S] scores."""
    width = max(config.hidden_size, config.intermediate_size)
    sequences = 6 * timesteps * batch * seq_len * width * element_bytes
    scores = 3 * timesteps * batch * config.num_attention_heads * seq_len * seq_len * element_bytes
    return sequences + scores


def choose_threads(option: str) -> int:
    """A positive --threads, or for "auto" the CPUs not already kept busy by other processes (at least 1)."""
    if option != "auto":
        return int(option)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(torch.get_num_threads(), cpus - busy))


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch.set_num_threads(choose_threads(args.threads))
    torch.manual_seed(args.seed)
    progress = not args.quiet
    t_start = time.perf_counter()
    version = library_version()  # read before the run: the library may change while it runs

    from ann2snn.models import parse_dtype

    ann, tok = ann2snn.load_ann(args.checkpoint, dtype=parse_dtype(args.dtype))
    ann.eval()
    config = ann.config
    windows = token_windows(tok, read_texts(args.data), args.seq_len, samples=None, seed=args.seed, max_tokens=args.max_tokens)
    calib_windows = token_windows(tok, read_texts(args.calib_data), args.seq_len, args.calib_samples, args.seed)
    macs = layer_macs(config, windows.shape[1])
    log(args, f"model {args.checkpoint}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"vocab {config.vocab_size}; eval windows {tuple(windows.shape)}, calibration windows {tuple(calib_windows.shape)}")
    scorer = Scorer(windows, progress)
    rows: list[Row] = []

    # The ANN, once: its argmax is the reference of every top-1 agreement.
    log(args, "[ANN]")
    ann_score = scorer.score(lambda ids: ann(input_ids=ids, use_cache=False).logits, args.batch_size, "ANN")
    rows.append(Row("—", "ANN", "float", "ann", coverage(macs, "ann"), ann_score, ann_score.seconds))
    ann_ppl = ann_score.ppl

    # ann2snn calibration, once, shared by every qwen2-recipe row (statistics do not depend on coding, T or rule).
    t0 = time.perf_counter()
    statistics, calibration_info = None, {"source": str(args.calib_data or "bundled")}
    if {"phase", "rate"} & set(args.methods):
        log(args, "[ann2snn calibration]")
        probe = copy.deepcopy(ann)
        ann2snn.convert(probe, tok, recipe="qwen2", timesteps=8, calib_data=args.calib_data, calib_samples=args.calib_samples,
                        seq_len=args.seq_len, seed=args.seed, progress=progress)
        statistics = probe.ann2snn["statistics"]
        calibration_info = probe.ann2snn["calibration"]
        del probe
    calib_seconds = time.perf_counter() - t0

    def run_ann2snn(T: int, coding: str, threshold: str | None) -> None:
        """threshold None: the recipe's default at this T (rule and headroom from its level table)."""
        recipe = get_recipe("qwen2").with_options(timesteps=T, coding=coding, threshold=threshold)
        variant = f"{coding} / {recipe.chosen_threshold} ×{recipe.chosen_headroom:g}"
        snn_sim = args.simulation or ("step" if T <= STEP_UP_TO else "fast")
        label = f"ann2snn qwen2 T={T} {variant}"
        log(args, f"[{label}]")
        t0 = time.perf_counter()
        model = copy.deepcopy(ann)
        try:
            ann2snn.convert(model, tok, recipe="qwen2", timesteps=T, coding=coding, threshold=threshold,
                            statistics=statistics, seed=args.seed, progress=False)
        except Ann2SnnError as exc:
            note = f"n/a: {str(exc).split(';')[0]}"
            if coding == "phase":
                note += " (ann2snn's default coding at this T is rate: see the rate / mse rows)"
            rows.append(Row(str(T), "ann2snn qwen2 (bound)", variant, "fast", None, note=note))
            rows.append(Row(str(T), "ann2snn qwen2 (SNN)", variant, snn_sim, None, note=note))
            return
        convert_s = time.perf_counter() - t0
        ranged = model.ann2snn["range_steps"]
        warning = join(f"range steps at {len(ranged)} sites (windows up to T+{max(ranged.values())})" if ranged else "",
                       structure_note(model, "qwen2"))

        def forward(ids):
            return model(input_ids=ids, use_cache=False).logits

        ann2snn.set_simulation(model, "fast")
        bound = scorer.score(forward, args.batch_size, f"{label} fast")
        rows.append(Row(str(T), "ann2snn qwen2 (bound)", variant, "fast", coverage(macs, "ann2snn"), bound, convert_s + bound.seconds,
                        note=warning))
        if snn_sim == "fast":
            rows.append(Row(str(T), "ann2snn qwen2 (SNN)", variant, "fast", coverage(macs, "ann2snn"), bound, convert_s + bound.seconds,
                            note=join("= bound (fast simulation)", warning)))
        else:
            ann2snn.set_simulation(model, snn_sim)
            snn = scorer.score(forward, args.batch_size, f"{label} {snn_sim}")
            gap = (snn.token_nll - bound.token_nll).abs().max().item()
            rows.append(Row(str(T), "ann2snn qwen2 (SNN)", variant, snn_sim, coverage(macs, "ann2snn"), snn, convert_s + snn.seconds,
                            note=join(f"max per-token abs(ΔNLL) vs bound {gap:.1e}", warning)))

    def run_spikingjelly(T: int) -> None:
        label = f"spikingjelly Qwen2 T={T}"
        variant = "signed IF (QCFS) / max"
        method = "spikingjelly Qwen2"
        log(args, f"[{label}]")
        if config.model_type != "qwen2":
            rows.append(Row(str(T), method, variant, "signed_if", None, note=f"n/a: recipe serves qwen2 only, not {config.model_type}"))
            return
        batch = args.sj_batch_size or max(1, min(4, 32 // T))
        peak = spikingjelly_peak_bytes(config, T, batch, windows.shape[1])
        if peak > 0.5 * available_memory_bytes():
            rows.append(Row(str(T), method, variant, "signed_if", coverage(macs, "spikingjelly"),
                            note=f"skipped: time/memory (≈{peak / 2**30:.1f} GiB per forward)"))
            return
        t0 = time.perf_counter()
        snn = spikingjelly_qwen2(ann, calib_windows, T, args.batch_size)
        setup_s = time.perf_counter() - t0
        try:
            score = scorer.score(spikingjelly_forward(snn), batch, label, budget_s=args.max_method_seconds)
        except (Skip, MemoryError) as exc:
            if progress:
                print(file=sys.stderr)
            rows.append(Row(str(T), method, variant, "signed_if", coverage(macs, "spikingjelly"), note=f"skipped: time/memory ({exc})"))
            return
        rows.append(Row(str(T), method, variant, "signed_if", coverage(macs, "spikingjelly"), score, setup_s + score.seconds,
                        note=f"batch {batch}"))

    for T in args.timesteps:
        done = len(rows)
        if "phase" in args.methods:
            run_ann2snn(T, "phase", None)
        if "rate" in args.methods:
            run_ann2snn(T, "rate", "mse")
            run_ann2snn(T, "rate", "max")
        if "spikingjelly" in args.methods:
            run_spikingjelly(T)
        for row in rows[done:]:  # as they come: a run killed later (memory, time) keeps the rows it finished
            log(args, fmt_row(row, ann_ppl))

    # The BrainTransformers baseline, at its own T only.
    if "braintransformers" in args.methods:
        log(args, f"[braintransformers T={BRAINTRANSFORMERS_T}]")
        t0 = time.perf_counter()
        model = copy.deepcopy(ann)
        ann2snn.convert(model, tok, recipe="braintransformers", statistics={}, seed=args.seed, progress=False)
        convert_s = time.perf_counter() - t0
        ann2snn.set_simulation(model, "fast")
        score = scorer.score(lambda ids: model(input_ids=ids, use_cache=False).logits, args.batch_size, "braintransformers fast")
        summary = model.ann2snn["recipe"]
        rows.append(Row(str(summary["timesteps"]), "ann2snn braintransformers (baseline)", f"{summary['coding']} / per-call max", "fast",
                        coverage(macs, "braintransformers"), score, convert_s + score.seconds,
                        note=join(f"batch {args.batch_size} (per-call scale is shared by the batch)", structure_note(model, "braintransformers"))))

    total_s = time.perf_counter() - t_start
    default_sim = args.simulation or f"step for T ≤ {STEP_UP_TO}, fast above"
    lines = [
        f"# SNN fidelity: {args.checkpoint}",
        "",
        f"- model: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, heads {config.num_attention_heads}/{getattr(config, 'num_key_value_heads', config.num_attention_heads)}, "
        f"vocab {config.vocab_size}, dtype {next(ann.parameters()).dtype}",
        f"- evaluation: {args.data}, {windows.shape[0]} windows × {windows.shape[1]} tokens "
        f"({windows[:, 1:].numel()} predicted tokens), the same windows for every row",
        f"- calibration: {calibration_info.get('source', args.calib_data)}, {calib_windows.shape[0]} windows × {calib_windows.shape[1]} tokens, "
        f"seed {args.seed}; ann2snn calibrated once in {calib_seconds:.1f} s (not in the rows' wall times)",
        f"- ANN perplexity: {ann_ppl:.3f}",
        f"- ann2snn SNN rows' simulation: {default_sim}; bound rows: fast (the fake-quantised ANN at the coding's levels)",
        "- spike-driven MACs: share of decoder Linear + QKᵀ + weights·V multiply-accumulates whose operands are all spike trains "
        "(see benchmarks/fidelity.py)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"ann2snn {version}; load average {load_at_start:.1f} at start (other processes share the CPUs: wall times are indicative); total wall {total_s:.0f} s",
        "",
        HEADER,
        *(fmt_row(row, ann_ppl) for row in rows),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report, encoding="utf-8")
        log(args, f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Ann2SnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
