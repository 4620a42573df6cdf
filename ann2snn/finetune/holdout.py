"""Held-out text: what decides whether a fine-tune (and each stdp update) is kept, and its noise.

The holdout is text the training never sees: a file of the user's (``holdout=PATH``)
or, by default, the last `HOLDOUT_SHARE` of the fine-tuning text's windows, cut off
before any training window is drawn (``Batches`` draws only from the rest).
`finetune` splits it: the rules choose on its even windows (distill's early
stopping, each stdp update), its odd windows take the decisions below, so that
a choice which only fitted the noise of the first half is not confirmed.

Its figures are means over windows, and so is their noise. With d_w the mean of a
per-token quantity over window w (windows of equal length, so the mean of the d_w
is the mean over tokens) and N windows,

    noise(d) = Z · std(d_w) / √N        (Z = 2: about 95 % of what chance alone gives lies within)

taken over windows rather than tokens because neighbouring tokens are not
independent. Two uses:

- the conversion's own gap, d_w = NLL_SNN − NLL_ANN: when it does not rise
  above chance (`beyond_chance`), the SNN is as good as the ANN as far as this
  text can tell, and fine-tuning can only make it worse; `finetune` then leaves
  it unchanged (unless ``force``);
- a change, d_w = NLL_before − NLL_after on the same windows (paired): it is kept
  only when that fall rises above chance and more than half of the windows fell
  (`helps_most_windows`). The second condition is the heavy tail again, the other
  way round: on Qwen2.5-Coder-0.5B (T=4, half code, half prose) a fine-tune fell
  by 0.158 ± 0.134 nats per token on the deciding half, beyond its noise, yet only
  89 of its 197 windows fell; on prose no stage saw it widened the gap by 43 %.

A mean rises above chance when it is positive and beyond its noise, or positive
with more of its windows above zero than chance gives (a sign test at the same Z:
more than N/2 + Z·√N/2 of the N windows). The second reading is for heavy-tailed
text: on code a few windows where clipped massive activations cost nats swamp the
standard error (Qwen2.5-Coder-0.5B at T=4: a gap of 0.21 nats per token, PPL ×1.23,
within a noise of ±0.28 over 33 windows), while the sign of most windows is plain.

The guard (`guard_windows`) is text of another kind, by default the bundled
probe text: a holdout cut from the fine-tuning text gains with it and cannot
see what the fine-tune costs elsewhere, so `finetune` undoes a fine-tune that
makes the guard worse beyond chance (`Difference.worse_beyond_chance`).

On qwen2-tiny (phase coding, T = 4, 8128 tokens of heldout.txt) the gap is 0.0436
nats per token and its noise 0.0067 nats (≈ 0.7 % of the perplexity); with fewer
tokens the noise grows as 1/√tokens. Below `MIN_HOLDOUT_TOKENS` tokens the noise
is larger than a good fine-tune's gain at large T, so `finetune` warns.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.data import PROBE_TEXT, bundled_text, read_texts, token_windows
from ..errors import ConfigError
from ..modules.neuron import set_simulation
from .common import logits, swapped_weights, synaptic_parameters

HOLDOUT_SHARE = 0.1  # of the fine-tuning text's windows, by default ...
MIN_HOLDOUT_TOKENS = 4096  # ... at least this many tokens while half the windows stay for training ...
MAX_HOLDOUT_TOKENS = 16384  # ... and at most this many (it is measured at every decision; its noise falls as 1/√tokens)
Z = 2.0
GUARD_SEQ_LEN = 64  # the guard text is short (the probe: about 1500 tokens): cut finely, it gives more windows
TEACHER_CACHE_BYTES = 256 * 2**20  # keep the ANN's log-probabilities below this; recompute them above


class HoldoutWarning(UserWarning):
    """The holdout is too small for its decisions to rise above the noise."""


def noise(values: torch.Tensor) -> float:
    """Z standard errors of the mean of per-window values."""
    if values.numel() < 2:
        return math.inf
    return Z * float(values.std()) / math.sqrt(values.numel())


@dataclass
class Difference:
    """A per-window difference on the holdout: its mean, noise, and how many of its windows are above zero."""

    mean: float
    noise: float
    above: int
    windows: int

    @classmethod
    def of(cls, values: torch.Tensor) -> "Difference":
        return cls(float(values.mean()), noise(values), int((values > 0).sum()), int(values.numel()))

    @property
    def beyond_chance(self) -> bool:
        """Positive, and beyond its noise or above zero in more windows than chance gives (a sign test at Z)."""
        if not self.mean > 0:
            return False
        return self.mean > self.noise or self._more_than_chance(self.above)

    @property
    def helps_most_windows(self) -> bool:
        """More than half of the windows above zero: the typical window gained, not only a few."""
        return self.above > self.windows / 2

    @property
    def worse_beyond_chance(self) -> bool:
        """Negative beyond its noise, or at or below zero in more windows than chance gives (whatever the mean:
        a few windows gaining nats must not hide most windows losing)."""
        return -self.mean > self.noise or self._more_than_chance(self.windows - self.above)

    def _more_than_chance(self, count: int) -> bool:
        """More than chance gives of the windows on one side of zero (a sign test at Z)."""
        return count - self.windows / 2 > Z * math.sqrt(self.windows) / 2


def split_holdout(windows: torch.Tensor, holdout, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training windows, holdout windows, where the holdout comes from).

    `holdout`: None (the last `HOLDOUT_SHARE` of the windows, at most
    `MAX_HOLDOUT_TOKENS` tokens, at least `MIN_HOLDOUT_TOKENS` while that leaves
    half of them for training), a
    share in (0, 1) of the windows, a path (.txt, .jsonl or folder: read with
    `read_texts`) or a list of texts. The holdout windows never overlap the
    training windows.
    """
    if holdout is None or isinstance(holdout, float):
        share = HOLDOUT_SHARE if holdout is None else holdout
        if not 0 < share < 1:
            raise ConfigError(f"a holdout share must be between 0 and 1, got {share!r}")
        count = windows.shape[0]
        held = math.ceil(share * count)
        if holdout is None:
            held = min(held, math.ceil(MAX_HOLDOUT_TOKENS / (seq_len - 1)))
            held = max(held, min(math.ceil(MIN_HOLDOUT_TOKENS / (seq_len - 1)), count // 2))
        if held < 2 or held >= count:
            raise ConfigError(f"the fine-tuning text gives {count} window(s) of {seq_len} tokens, too few to hold "
                              f"some out; pass more text or a holdout file")
        return windows[:-held], windows[-held:], f"last {held} of {count} windows of the text"
    if not _file_or_texts(holdout):
        raise ConfigError(f"holdout must be a share between 0 and 1, a file or a list of texts, got {holdout!r}")
    held, source = _text_windows(holdout, "holdout", tokenizer, seq_len)
    return windows, held, source


def guard_windows(guard, tokenizer, seq_len: int) -> tuple[torch.Tensor | None, str | None]:
    """(windows of the guard text, where it comes from), or (None, None) when `guard` is False.

    `guard`: None (the bundled probe text: code, logs, a manual; text of another
    kind than most fine-tuning text), a path (.txt, .jsonl or folder) or a list
    of texts. It is cut into windows of at most `GUARD_SEQ_LEN` tokens: short text
    gives more windows that way, and its decision counts windows.
    """
    if guard is False:
        return None, None
    if guard is None:
        windows, _ = _text_windows(bundled_text(PROBE_TEXT), "guard", tokenizer, min(seq_len, GUARD_SEQ_LEN))
        return windows, f"bundled {PROBE_TEXT}"
    if not _file_or_texts(guard):
        raise ConfigError(f"guard must be a file, a list of texts or False, got {guard!r}")
    return _text_windows(guard, "guard", tokenizer, min(seq_len, GUARD_SEQ_LEN))


def _file_or_texts(value) -> bool:
    return isinstance(value, (str, Path)) or (isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value))


def _text_windows(value, what: str, tokenizer, seq_len: int) -> tuple[torch.Tensor, str]:
    """(windows of `seq_len` tokens, where they come from) of a path or a list of texts; at least 2 windows."""
    texts, source = (list(value), "texts") if isinstance(value, (list, tuple)) else (read_texts(value, what), str(value))
    windows = token_windows(tokenizer, texts, seq_len)
    if windows.shape[0] < 2:
        raise ConfigError(f"the {what} {source} gives fewer than 2 windows of {seq_len} tokens; pass more text")
    return windows, source


def warn_if_small(windows: torch.Tensor) -> str | None:
    """A warning (also returned, for the figures) when the holdout has fewer than `MIN_HOLDOUT_TOKENS` tokens."""
    tokens = int(windows[:, 1:].numel())
    if tokens >= MIN_HOLDOUT_TOKENS:
        return None
    message = (f"the holdout has {tokens} tokens, fewer than the {MIN_HOLDOUT_TOKENS} needed for its decisions to rise "
               f"above the noise; pass more text or a larger holdout file")
    warnings.warn(message, HoldoutWarning, stacklevel=3)
    return message


@dataclass
class HoldoutFigures:
    """One pass over the holdout: per-window mean KL(ANN ‖ SNN) and NLL of the SNN, and their means."""

    kl_windows: torch.Tensor
    nll_windows: torch.Tensor

    @property
    def kl(self) -> float:
        return float(self.kl_windows.mean())

    @property
    def ppl_snn(self) -> float:
        return math.exp(float(self.nll_windows.mean()))


class Holdout:
    """The holdout windows: the teacher's (ANN's) figures once, then the SNN's against them on demand.

    The teacher runs with the converted weights (`originals`, for rules that
    change them). Its log-probabilities are kept while they fit in
    `TEACHER_CACHE_BYTES`; above that (large vocabularies: 3.8 GB for 98 windows
    of 64 tokens of Qwen2.5's 151 936) its last hidden state is kept instead (the
    final norm's output, 22 MB there) and only the output layer runs again at each
    evaluation: on Qwen2.5-Coder-0.5B that is a quarter of the model's
    multiply-adds in place of all of them (the teacher had taken a third of a
    fine-tune's time).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, originals: dict[str, torch.Tensor] | None,
                 batch_size: int = 4):
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.params = synaptic_parameters(model)
        self.originals = originals
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        self.cached = windows.numel() * vocab * 4 <= TEACHER_CACHE_BYTES
        self.teacher: list[torch.Tensor] = []  # per batch: the log-probabilities if cached, else the hidden state
        nll = []
        for ids in self._batches():
            hidden, log_probs = self._teacher(ids)
            self.teacher.append((log_probs if self.cached else hidden).cpu())
            nll.append(_nll_per_window(log_probs, ids))
        self.nll_ann_windows = torch.cat(nll)

    @property
    def tokens(self) -> int:
        return int(self.windows[:, 1:].numel())

    @property
    def ppl_ann(self) -> float:
        return math.exp(float(self.nll_ann_windows.mean()))

    def _batches(self):
        for start in range(0, self.windows.shape[0], self.batch_size):
            yield self.windows[start:start + self.batch_size].to(self.device)

    @contextlib.contextmanager
    def _as_teacher(self):
        with swapped_weights(self.params, self.originals):
            set_simulation(self.model, "ann")
            try:
                yield
            finally:
                set_simulation(self.model, "fast")

    @torch.no_grad()
    def _teacher(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ANN's last hidden state (after the final norm) and log-probabilities."""
        with self._as_teacher():
            out = self.model(input_ids=ids, use_cache=False, output_hidden_states=True)
            return out.hidden_states[-1], F.log_softmax(out.logits.float(), -1)

    @torch.no_grad()
    def _teacher_log_probs(self, index: int) -> torch.Tensor:
        kept = self.teacher[index].to(self.device)
        if self.cached:
            return kept
        with self._as_teacher():
            return F.log_softmax(self.model.get_output_embeddings()(kept).float(), -1)

    @torch.no_grad()
    def evaluate(self) -> HoldoutFigures:
        """The SNN ("fast" simulation) on the holdout, against the teacher."""
        set_simulation(self.model, "fast")
        kl, nll = [], []
        for index, ids in enumerate(self._batches()):
            teacher = self._teacher_log_probs(index)
            student = F.log_softmax(logits(self.model, ids).float(), -1)
            kl.append((teacher.exp() * (teacher - student)).sum(-1).mean(-1).cpu())
            nll.append(_nll_per_window(student, ids))
        return HoldoutFigures(torch.cat(kl), torch.cat(nll))

    def gap(self, figures: HoldoutFigures) -> Difference:
        """NLL_SNN − NLL_ANN per token, in nats, by window."""
        return Difference.of(figures.nll_windows - self.nll_ann_windows)


def improvement(after: HoldoutFigures, before: HoldoutFigures, key: str = "nll",
                windows: torch.Tensor | None = None) -> Difference:
    """The fall of the per-window `key` ("nll" or "kl") from `before` to `after`, paired by window
    (over the `windows` a boolean mask selects, or all)."""
    fall = getattr(before, f"{key}_windows") - getattr(after, f"{key}_windows")
    return Difference.of(fall if windows is None else fall[windows])


def _nll_per_window(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window [B]."""
    nll = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll.mean(-1).cpu()
