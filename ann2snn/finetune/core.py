"""`finetune`: run a learning rule on a converted model, kept only if it helps on held-out text; checkpoints and resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.data import bundled_text, read_texts, token_windows
from ..errors import CheckpointError, ConfigError
from ..modules.neuron import set_simulation
from .common import Batches, mean_abs_weight, synaptic_parameters
from .distill import Distill
from .holdout import Holdout, HoldoutFigures, guard_windows, improvement, split_holdout, warn_if_small
from .rule import LearningRule
from .stdp import Stdp
from .ste import calibrated_neurons

LEARNING_RULES = {rule.name: rule for rule in (Distill, Stdp)}
RULES = tuple(LEARNING_RULES)
CHECKPOINT_FILE = "finetune-checkpoint.pt"
# 3: options as dataclasses, per-window holdout figures; 4: stdp early-stopped; 5: stdp's gate sum;
# 6: distill's start KL and rate back-offs; 7: distill's weight rate relative to the weights' scale
CHECKPOINT_FORMAT = 7


def finetune(model, tokenizer, texts, rule: str = "distill", steps: int = 200, lr: float | None = None,
             seed: int = 0, batch_size: int = 4, seq_len: int = 128, checkpoint_dir: str | Path | None = None,
             resume: bool = False, train_weights: bool = True, progress: bool = True, *,
             checkpoint_every: int = 50, holdout=None, force: bool = False, max_tokens: int | None = None,
             weight_lr: float | None = None, mix: float = 0.0, guard=None, **rule_options) -> dict:
    """Fine-tune a converted SNN (`ann2snn.convert` / `ann2snn.load`) on `texts`, in place; returns its figures.

    rule: ``"distill"`` (gradient: thresholds and — unless ``train_weights=False`` — the
    Synapsis weights, at Adam rate ``weight_lr`` (default: relative to the weights' scale),
    towards the ANN's next-token distribution, see `ann2snn.finetune.distill`) or ``"stdp"`` (reward-modulated
    STDP on the Synapsis weights with homeostatic thresholds, see
    `ann2snn.finetune.stdp`). `rule_options` are the fields of the rule's
    options dataclass (`DistillOptions`, `StdpOptions`); unknown ones are refused.
    `lr`: the rule's rate (distill: Adam on log-thresholds, default 3e-2, on a
    cosine schedule over `steps`; stdp: η, default 4).

    The texts are cut into windows of `seq_len` tokens (`max_tokens` caps the
    text used). `holdout` is the text that decides (see
    `ann2snn.finetune.holdout`): None holds out the last tenth of the windows (at
    least 4096 tokens while half stay for training), a number in (0, 1) that share,
    a path or a list of texts that text; the training never sees it. Fewer than
    4096 holdout tokens give a `HoldoutWarning`. Its even windows are the rules'
    to choose on (distill's early stopping, stdp's updates), its odd windows
    decide (and give the figures): a choice made on noise is not confirmed by
    windows it was not made on. `steps` batches of
    `batch_size` windows are drawn from the training windows by `seed`. `mix` in
    [0, 1): that share of the training windows is bundled English prose
    (`train.txt`) added to the user's, for a fine-tune that should hold on text
    of other kinds too; the holdout then gets the same share of bundled windows
    the training never sees, so that the decision weighs both kinds, and a
    fine-tune that makes the user's own holdout windows worse beyond chance is
    undone even when the whole holdout gains.

    `guard` is text of another kind that only vetoes: a fine-tune that makes
    it worse beyond chance (`Difference.worse_beyond_chance`, the SNN's NLL by
    window, paired) is undone, whatever the holdout gained. A holdout cut from
    the fine-tuning text gains with that text; the guard sees what it cost
    elsewhere. None: the bundled probe text (code, logs, a manual); a path or a
    list of texts: that text; False: no guard.

    When the conversion's own gap on the holdout (NLL of the SNN − NLL of the
    ANN) is within its noise, nothing is trained and the model is left as it
    is (``skipped`` says why), unless `force`. After training, the fine-tune is
    kept only if the holdout NLL fell by more than its noise; otherwise every
    change is undone (``reverted``); so is one that most holdout windows do not share
    (a few windows gaining much, most losing a little).

    With `checkpoint_dir`, the state (thresholds, changed weights, optimizer
    state, step, RNG) is written there every `checkpoint_every` steps and at the
    end; `resume=True` continues from it (same rule, settings and texts; a
    larger `steps` continues further).

    The model ends in ``"fast"`` simulation; its ``model.ann2snn["finetune"]``
    (written into an export's snn_config.json by `ann2snn.save`) records the figures.
    """
    started = time.monotonic()
    _check_options(rule, steps, lr, batch_size, seq_len, checkpoint_every, resume, checkpoint_dir, mix)
    Rule = LEARNING_RULES[rule]
    # options kept as arguments of `finetune` and the CLI's flags: both rules' train_weights, distill's weight_lr
    rule_options = {"train_weights": bool(train_weights), **rule_options}
    if rule == "distill" and weight_lr is not None:
        rule_options = {"weight_lr": weight_lr, **rule_options}
    options = Rule.options_from(rule_options)
    neurons = calibrated_neurons(model, softmax=getattr(options, "softmax", False))
    if not neurons:
        raise ConfigError("this model has no calibrated spiking neurons to fine-tune; convert it with ann2snn first")
    lr = Rule.default_lr if lr is None else lr

    windows = token_windows(tokenizer, list(texts), seq_len, max_tokens=max_tokens)
    train, val, holdout_source = split_holdout(windows, holdout, tokenizer, seq_len)
    train, val, mixed, prose = _mixed(train, val, mix, tokenizer, seq_len)
    small = warn_if_small(val)
    guard_ids, guard_source = guard_windows(guard, tokenizer, seq_len)
    device = next(model.parameters()).device

    synaptic = synaptic_parameters(model)
    initial_deltas = {name: n.delta.detach().clone() for name, n in neurons}
    originals = {name: p.detach().clone() for name, p in synaptic.items()} if Rule.changes_weights(options) else None
    grad_flags = {p: p.requires_grad for p in model.parameters()}

    settings = {"rule": rule, "lr": lr, "seed": seed, "batch_size": batch_size, "seq_len": seq_len,
                "options": dataclasses.asdict(options), "data": _digest(train), "holdout": _digest(val),
                "model": _model_digest(neurons, synaptic)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    was_training = model.training
    model.eval()
    set_simulation(model, "fast")
    for param in model.parameters():
        param.requires_grad_(False)
    saved, losses, skipped, undone, fall, own, guarded = None, [], None, None, None, None, None
    try:
        # the rules choose on one half of the holdout (early stopping, stdp's updates); the other half decides
        select, deciding = Holdout(model, val[0::2], originals), Holdout(model, val[1::2], originals)
        saved = _read_checkpoint(checkpoint, fingerprint) if resume else None
        before = HoldoutFigures(**saved["before"]) if saved else deciding.evaluate()
        gap = deciding.gap(before)
        if not gap.beyond_chance and not force:
            skipped = (f"the conversion's gap on the holdout ({gap.mean:+.4f} nats per token, worse in {gap.above} of "
                       f"{gap.windows} windows) is within its noise (±{gap.noise:.4f}): fine-tuning could only make it "
                       f"worse, so the SNN is left as it is (force=True / --force to fine-tune anyway)")
            after = before
        else:
            losses = saved["losses"] if saved else []
            guard_text = Holdout(model, guard_ids, originals) if guard_ids is not None else None
            guard_before = guard_text.evaluate() if guard_text else None
            trainer = Rule(model, options, lr=lr, steps=steps, synaptic=synaptic, originals=originals, holdout=select)
            header = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "settings": settings, "before": vars(before)}
            summary = _train(trainer, Batches(train, batch_size, seed), device, steps, saved, losses, checkpoint,
                             checkpoint_every, progress, header)
            after = deciding.evaluate()
            fall = improvement(after, before)
            own = improvement(after, before, windows=~prose[1::2]) if mix else None
            guarded = improvement(guard_text.evaluate(), guard_before) if guard_text else None
            undone = _why_undone(fall, own, guarded)
            if undone:  # not kept: hand the model back as it came
                with torch.no_grad():
                    for name, neuron in neurons:
                        neuron.delta.copy_(initial_deltas[name])
                    for name, value in (originals or {}).items():
                        synaptic[name].copy_(value)
                after = deciding.evaluate()
    finally:
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
        set_simulation(model, "fast")
        model.train(was_training)

    figures = {
        "rule": rule, "steps": steps, "resumed_from_step": saved["step"] if saved else None, "lr": lr,
        "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "options": dataclasses.asdict(options),
        "train_weights": bool(getattr(options, "train_weights", False)),
        "train_windows": int(train.shape[0]), "mix": mix, "mixed_windows": mixed, "holdout": holdout_source,
        "held_out_windows": int(val.shape[0]), "mixed_held_out_windows": int(prose.sum()),
        "held_out_tokens": deciding.tokens, "selection_tokens": select.tokens, "ppl_ann": deciding.ppl_ann,
        "ppl_snn_before": before.ppl_snn, "ppl_snn_after": after.ppl_snn, "kl_before": before.kl, "kl_after": after.kl,
        "gap_nats": gap.mean, "gap_noise_nats": gap.noise, "gap_windows_worse": [gap.above, gap.windows],
        "fall_nats": fall and fall.mean, "fall_noise_nats": fall and fall.noise,
        "fall_windows_better": fall and [fall.above, fall.windows],
        "own_fall_nats": own and own.mean, "own_fall_noise_nats": own and own.noise,
        "own_fall_windows_better": own and [own.above, own.windows], "guard": guard_source,
        "guard_fall_nats": guarded and guarded.mean, "guard_fall_noise_nats": guarded and guarded.noise,
        "guard_fall_windows_better": guarded and [guarded.above, guarded.windows],
        "first_loss": losses[0] if losses else None, "last_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "skipped": skipped, "reverted": undone is not None, "undone_because": undone, "warnings": [w for w in (small,) if w],
        "wall_s": time.monotonic() - started,
    }
    figures.update(_changes(neurons, initial_deltas, synaptic, originals))
    if not skipped:
        figures.update(summary)
    meta = getattr(model, "ann2snn", None)
    if isinstance(meta, dict):
        meta["finetune"] = {key: value for key, value in figures.items() if key != "wall_s"}
    return figures


def check_rule_options(rule: str, options: dict) -> None:
    """Refuse option names the rule does not take, and invalid values (before anything loads)."""
    _check_options(rule, 1, None, 1, 2, 1, False, None)
    LEARNING_RULES[rule].options_from(options)


def _train(trainer: LearningRule, batches: Batches, device, steps: int, saved: dict | None, losses: list[float],
           checkpoint: Path | None, checkpoint_every: int, progress: bool, header: dict) -> dict:
    """`steps` batches through the rule (from a checkpoint's step when resuming); returns the rule's summary."""
    start = 0
    with trainer:
        if saved:
            trainer.load_state_dict(saved["trainer"])
            torch.set_rng_state(saved["rng"]["torch"])
            start = saved["step"]
        bar = tqdm(total=steps, initial=min(start, steps), desc=f"finetune ({trainer.name})", unit="step",
                   disable=not progress)
        try:
            for k in range(start, steps):
                losses.append(trainer.step(batches(k).to(device), k, last=k + 1 == steps))
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                bar.update(1)
                if checkpoint is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
                    _write_checkpoint(checkpoint, {**header, "step": k + 1, "trainer": trainer.state_dict(),
                                                   "losses": losses, "rng": {"torch": torch.get_rng_state()}})
        finally:
            bar.close()
        return trainer.summary()


def _mixed(train: torch.Tensor, val: torch.Tensor, mix: float, tokenizer,
           seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Training and holdout windows with bundled prose added as a `mix` share of each.

    Returns them, how many prose windows the training got, and which holdout
    windows are prose (a mask). The holdout's prose windows follow the
    training's in the bundled text: the training never sees them.
    """
    if not mix:
        return train, val, 0, torch.zeros(val.shape[0], dtype=torch.bool)
    for_train, for_val = (round(mix / (1 - mix) * part.shape[0]) for part in (train, val))
    wanted = for_train + for_val
    prose = token_windows(tokenizer, read_texts(bundled_text()), seq_len, max_tokens=wanted * seq_len)
    if prose.shape[0] < wanted:
        raise ConfigError(f"mix {mix} asks for {wanted} windows of bundled text beside the "
                          f"{train.shape[0] + val.shape[0]} of yours; it holds {prose.shape[0]}: pass a smaller mix")
    prose = prose.to(train.dtype)
    is_prose = torch.cat([torch.zeros(val.shape[0], dtype=torch.bool), torch.ones(for_val, dtype=torch.bool)])
    return torch.cat([train, prose[:for_train]]), torch.cat([val, prose[for_train:wanted]]), for_train, is_prose


def _why_undone(fall, own, guarded) -> str | None:
    """Why a fine-tune is not kept, or None: kept is a gain beyond chance that most holdout windows share,
    (with `mix`) the user's own holdout windows not worse beyond chance, and the guard text not worse beyond chance."""
    if not fall.beyond_chance:
        return "it did not lower the held-out perplexity beyond its noise"
    if not fall.helps_most_windows:
        return (f"only {fall.above} of the {fall.windows} held-out windows gained (a few gained much, most lost): "
                f"not a gain the typical window shares")
    if own is not None and own.worse_beyond_chance:
        return f"it made your own held-out windows worse ({own.above} of {own.windows} gained)"
    if guarded is not None and guarded.worse_beyond_chance:
        return (f"it made the guard text (another kind) worse: {guarded.mean:+.4f} ± {guarded.noise:.4f} nats per token, "
                f"{guarded.above} of {guarded.windows} windows gained")
    return None


def gap_reduction(figures: dict) -> float:
    """How much of the held-out gap PPL(SNN) − PPL(ANN) the fine-tune removed, in %."""
    gap = figures["ppl_snn_before"] - figures["ppl_ann"]
    return 100.0 * (gap - (figures["ppl_snn_after"] - figures["ppl_ann"])) / gap if gap else 0.0


def _check_options(rule, steps, lr, batch_size, seq_len, checkpoint_every, resume, checkpoint_dir, mix=0.0):
    if rule not in RULES:
        raise ConfigError(f"unknown fine-tuning rule {rule!r}; choose one of {', '.join(RULES)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 <= mix < 1:
        raise ConfigError(f"mix must be a share in [0, 1), got {mix!r}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume needs the checkpoint_dir of the run to continue")


def _digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


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
        out["mean_abs_w"] = mean_abs_weight(originals)
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
