"""`finetune`: run a plasticity rule on a converted model, with held-out figures, checkpoints and resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.data import token_windows
from ..errors import CheckpointError, ConfigError
from ..modules.neuron import set_simulation
from .common import Batches, HeldOut, synaptic_parameters
from .distill import SCHEDULES, DistillRule
from .stdp import STDPRule
from .ste import calibrated_neurons

RULES = ("distill", "stdp")
CHECKPOINT_FILE = "finetune-checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: stdp keeps held-out KL and perplexity, and teaches locally by default
DISTILL_DEFAULTS = {"schedule": "cosine", "softmax": False, "warmup": 0, "hidden": 1.0, "scale_lr": None}  # see `DistillRule`


def finetune(model, tokenizer, texts, rule: str = "distill", steps: int = 200, lr: float | None = None,
             seed: int = 0, batch_size: int = 4, seq_len: int = 128, checkpoint_dir: str | Path | None = None,
             resume: bool = False, train_weights: bool = False, progress: bool = True, *,
             checkpoint_every: int = 50, held_out_windows: int | None = None, max_tokens: int | None = None,
             weight_lr: float | None = None, **rule_options) -> dict:
    """Fine-tune a converted SNN (`ann2snn.convert` / `ann2snn.load`) on `texts`, in place; returns its figures.

    rule: ``"distill"`` (gradient: thresholds — and with ``train_weights`` the
    Synapsis weights — towards the ANN's next-token distribution, see
    `ann2snn.finetune.distill`) or ``"stdp"`` (reward-modulated STDP on the
    Synapsis weights with homeostatic thresholds, see `ann2snn.finetune.stdp`).

    The texts are cut into windows of `seq_len` tokens; the last
    `held_out_windows` of them (default 8 for distill, 32 for stdp, whose
    safeguard selects updates on them; at most a tenth, at least one) are held
    out of training and give the figures before and after.
    `steps` batches of `batch_size` windows are drawn from the rest by `seed`.
    `lr`: the rule's rate (distill: Adam on log-thresholds, default 3e-2, on a
    cosine schedule over `steps`; stdp: η, default 8). `weight_lr`: distill's
    Adam rate for weights (default 1e-4). `rule_options` go to the rule
    (distill: schedule, hidden, scale_lr, softmax, warmup — see
    `ann2snn.finetune.distill`; stdp: a_plus, a_minus, tau_plus, tau_minus,
    beta, baseline_decay, anchor, threshold_rate, target_rate, accumulate,
    min_improvement, teacher). `max_tokens` caps the text used.

    With `checkpoint_dir`, the state (thresholds, changed weights, optimizer
    state, step, RNG) is written there every `checkpoint_every` steps and at the
    end; `resume=True` continues from it (same rule, settings and texts; a
    larger `steps` continues further). If the fine-tuned model ends worse on the
    held-out windows than it started, every change is undone (``reverted``).

    The model keeps the better state, in ``"fast"`` simulation; its
    ``model.ann2snn["finetune"]`` (written into an export's snn_config.json by
    `ann2snn.save`) records the figures.
    """
    started = time.monotonic()
    _check_options(rule, steps, lr, batch_size, seq_len, checkpoint_every,
                   1 if held_out_windows is None else held_out_windows, resume, checkpoint_dir)
    check_rule_options(rule, rule_options)
    if rule == "distill":
        rule_options = {**DISTILL_DEFAULTS, **rule_options}
        if rule_options["schedule"] not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {rule_options['schedule']!r}")
        for name in ("hidden", "scale_lr", "warmup"):
            value = rule_options[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a number of at least 0, got {value!r}")
    neurons = calibrated_neurons(model, softmax=rule == "distill" and bool(rule_options["softmax"]))
    if not neurons:
        raise ConfigError("this model has no calibrated spiking neurons to fine-tune; convert it with ann2snn first")
    lr = (DistillRule if rule == "distill" else STDPRule).default_lr if lr is None else lr
    if held_out_windows is None:
        held_out_windows = 8 if rule == "distill" else 32

    windows = token_windows(tokenizer, list(texts), seq_len, max_tokens=max_tokens)
    held = max(1, min(held_out_windows, windows.shape[0] // 10))
    train, val = (windows, windows) if windows.shape[0] < 2 else (windows[:-held], windows[-held:])
    device = next(model.parameters()).device

    synaptic = synaptic_parameters(model)
    changes_weights = rule == "stdp" or train_weights
    initial_deltas = {name: n.delta.detach().clone() for name, n in neurons}
    originals = {name: p.detach().clone() for name, p in synaptic.items()} if changes_weights else None
    grad_flags = {p: p.requires_grad for p in model.parameters()}

    settings = {"rule": rule, "lr": lr, "seed": seed, "batch_size": batch_size, "seq_len": seq_len,
                "train_weights": bool(train_weights), "weight_lr": weight_lr, "options": rule_options,
                "data": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), "held_out": int(val.shape[0]),
                "model": _model_digest(neurons, synaptic)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    was_training = model.training
    model.eval()
    set_simulation(model, "fast")
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        held_out = HeldOut(model, val, originals)
        saved = _read_checkpoint(checkpoint, fingerprint) if resume else None
        before = saved["before"] if saved else held_out.evaluate()
        if rule == "distill":
            trainer = DistillRule(model, lr=lr, train_weights=train_weights, weight_lr=weight_lr, steps=steps,
                                  synaptic=synaptic, originals=originals if train_weights else None, **rule_options)
        else:
            trainer = STDPRule(model, lr=lr, synaptic=synaptic, originals=originals, held_out=held_out, **rule_options)
        start = 0
        batches = Batches(train, batch_size, seed)
        losses: list[float] = saved["losses"] if saved else []
        with trainer:
            if saved:
                trainer.load_state_dict(saved["trainer"])
                torch.set_rng_state(saved["rng"]["torch"])
                start = saved["step"]
            bar = tqdm(total=steps, initial=min(start, steps), desc=f"finetune ({rule})", unit="step", disable=not progress)
            try:
                for k in range(start, steps):
                    losses.append(trainer.step(batches(k).to(device), k, last=k + 1 == steps))
                    recent = losses[-20:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                    bar.update(1)
                    if checkpoint is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
                        _write_checkpoint(checkpoint, {
                            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "settings": settings,
                            "step": k + 1, "trainer": trainer.state_dict(), "before": before, "losses": losses,
                            "rng": {"torch": torch.get_rng_state()}})
            finally:
                bar.close()
            summary = trainer.summary()
        after = held_out.evaluate()
        reverted = after["kl"] > before["kl"]
        if reverted:  # never hand back a model worse than it came
            with torch.no_grad():
                for name, neuron in neurons:
                    neuron.delta.copy_(initial_deltas[name])
                for name, value in (originals or {}).items():
                    synaptic[name].copy_(value)
            after = held_out.evaluate()
    finally:
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
        set_simulation(model, "fast")
        model.train(was_training)

    figures = {
        "rule": rule, "steps": steps, "resumed_from_step": saved["step"] if saved else None, "lr": lr,
        "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "train_weights": bool(train_weights),
        "options": dict(rule_options),
        "train_windows": int(train.shape[0]), "held_out_windows": int(val.shape[0]),
        "held_out_tokens": int(val[:, 1:].numel()),
        "ppl_ann": held_out.ppl_ann, "ppl_snn_before": before["ppl_snn"], "ppl_snn_after": after["ppl_snn"],
        "kl_before": before["kl"], "kl_after": after["kl"],
        "first_loss": losses[0] if losses else None, "last_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "reverted": reverted, "wall_s": time.monotonic() - started,
    }
    figures.update(_changes(neurons, initial_deltas, synaptic, originals))
    figures.update(summary)
    meta = getattr(model, "ann2snn", None)
    if isinstance(meta, dict):
        meta["finetune"] = {key: value for key, value in figures.items() if key != "wall_s"}
    return figures


def check_rule_options(rule: str, options: dict) -> None:
    """Refuse option names the rule does not take (before anything loads)."""
    known = (DistillRule if rule == "distill" else STDPRule).options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"rule {rule!r} takes no option(s) {', '.join(unknown)}; its options: {', '.join(known)}")


def gap_reduction(figures: dict) -> float:
    """How much of the held-out gap PPL(SNN) − PPL(ANN) the fine-tune removed, in %."""
    gap = figures["ppl_snn_before"] - figures["ppl_ann"]
    return 100.0 * (gap - (figures["ppl_snn_after"] - figures["ppl_ann"])) / gap if gap else 0.0


def _check_options(rule, steps, lr, batch_size, seq_len, checkpoint_every, held_out_windows, resume, checkpoint_dir):
    if rule not in RULES:
        raise ConfigError(f"unknown fine-tuning rule {rule!r}; choose one of {', '.join(RULES)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("held_out_windows", held_out_windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume needs the checkpoint_dir of the run to continue")


def _model_digest(neurons, synaptic) -> str:
    """What the run starts from: every threshold and a sample of every weight, so a checkpoint fits only its model."""
    digest = hashlib.sha256()
    for name, neuron in neurons:
        digest.update(name.encode())
        digest.update(neuron.delta.detach().float().cpu().numpy().tobytes())
    for name, param in synaptic.items():
        digest.update(name.encode())
        digest.update(param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _changes(neurons, initial_deltas, synaptic, originals) -> dict:
    changed, total, rel = 0, 0, 0.0
    for name, neuron in neurons:
        ratio = neuron.delta.detach().float() / initial_deltas[name].float()
        moved = (ratio - 1).abs()
        changed += int((moved > 1e-6).sum())
        total += moved.numel()
        rel += float(moved.sum())
    out = {"thresholds_changed": changed, "thresholds_total": total,
           "mean_threshold_change_pct": 100.0 * rel / max(total, 1)}
    if originals:
        diff = [(synaptic[name].detach().float() - value.float()) for name, value in originals.items() if name.endswith("weight")]
        count = sum(d.numel() for d in diff)
        out["mean_abs_dw"] = sum(float(d.abs().sum()) for d in diff) / count
        out["mean_abs_w"] = sum(float(originals[n].abs().sum()) for n in originals if n.endswith("weight")) / count
        out["weights_changed"] = sum(int((d != 0).sum()) for d in diff)
    else:
        out["mean_abs_dw"] = 0.0
        out["weights_changed"] = 0
    return out


def _write_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written beside, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except OSError as exc:
        raise CheckpointError(f"could not write the fine-tuning checkpoint {path}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def _read_checkpoint(path: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint to resume from, or None when there is none yet (the run then starts from step 0)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read the fine-tuning checkpoint {path} ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not an ann2snn fine-tuning checkpoint; delete it to start over")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by another ann2snn version (checkpoint format {state['format']}, this "
                              f"one reads {CHECKPOINT_FORMAT}); delete it to start over")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"the checkpoint in {path.parent} was made with other settings or text "
                              f"({state.get('settings', {}).get('rule')} rule); resume with the same options or delete it")
    return state
