"""Calibration and evaluation text: reading it safely and cutting it into token windows.

Accepted: a `.txt` file, a `.jsonl` file whose lines are objects with a string
`text` field, or a folder of `.txt` files. Every file is untrusted: empty,
binary, non-UTF-8 or absurdly long-lined input is refused with a one-line
`CalibrationDataError`.

Too little text is refused too: calibration (and fine-tuning) need at least
`MIN_TOKENS` tokens, or all they asked for when they ask for fewer; between
that floor and what was asked, `calibration_windows` warns with both counts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..errors import CalibrationDataError

MAX_LINE_CHARS = 2_000_000  # one line longer than this is not prose; refuse rather than stall the tokenizer
MAX_FILE_BYTES = 512 * 1024 * 1024
# Fewest tokens calibration accepts (unless asked for fewer). qwen2-tiny at phase T=8, held-out perplexity ratio
# SNN/ANN by calibration tokens of the bundled text: 256 → 1.0094, 1024 → 1.0016, 4096 (the default) → 1.0006;
# one sentence (10 tokens) gave 1.30 (docs/usage.md).
MIN_TOKENS = 1024


class TooLittleTextWarning(UserWarning):
    """The text gave fewer tokens or windows than asked for (but more than the floor, `MIN_TOKENS`)."""


def bundled_text(name: str = "train.txt") -> Path:
    """The English text shipped with ann2snn (see ann2snn/data/corpus/SOURCE.md)."""
    return Path(__file__).resolve().parent.parent / "data" / "corpus" / name


# Text unlike any the calibration usually is (code in four languages, a log, JSON, a table of settings, a
# maintenance manual; written for ann2snn, SOURCE.md): per-site levels check what they cost on it as well as on
# the calibration windows (calibration/levels.py).
PROBE_TEXT = "probe.txt"
PROBE_WINDOWS = 4


def probe_windows(tokenizer, seq_len: int) -> torch.Tensor:
    """The first PROBE_WINDOWS windows of `seq_len` tokens of the bundled probe text (fewer if it is shorter)."""
    text = bundled_text(PROBE_TEXT).read_text(encoding="utf-8")
    return token_windows(tokenizer, [text], seq_len, max_tokens=PROBE_WINDOWS * seq_len)


def _read_utf8(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CalibrationDataError(f"cannot read {path}: {exc.strerror}; pass a readable .txt, .jsonl or folder of .txt files") from None
    if size > MAX_FILE_BYTES:
        raise CalibrationDataError(f"{path} is {size} bytes, more than the {MAX_FILE_BYTES} ann2snn reads; pass a smaller sample of the text")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise CalibrationDataError(f"{path} looks binary (it holds NUL bytes); pass UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path} is not UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None


def _check_lines(path: Path, text: str) -> None:
    longest = max((len(line) for line in text.splitlines()), default=0)
    if longest > MAX_LINE_CHARS:
        raise CalibrationDataError(
            f"{path} has a line of {longest} characters (more than {MAX_LINE_CHARS}); split it into lines or paragraphs"
        )


def _read_jsonl(path: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CalibrationDataError(f"{path}:{number} is not valid JSON; each line must be an object with a \"text\" field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(f"{path}:{number} has no string \"text\" field; each line must be {{\"text\": \"...\"}}")
        texts.append(record["text"])
    return texts


def read_texts(path: str | Path | None = None, role: str = "calibration data") -> list[str]:
    """The documents in `path` (default: the bundled training text), each a string.

    `role` names the text in messages ("calibration data", "evaluation data", ...)."""
    path = bundled_text() if path is None else Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise CalibrationDataError(f"folder {path} holds no .txt files; put the text in .txt files or pass a .txt/.jsonl file")
    elif path.is_file():
        files = [path]
    else:
        bundled = bundled_text(path.name)
        hint = f" (the bundled text of that name is {bundled})" if path.parent == Path() and bundled.is_file() else ""
        raise CalibrationDataError(f"{role} {path} does not exist; pass a .txt file, a .jsonl file or a folder of .txt "
                                   f"files{hint}")

    texts: list[str] = []
    for file in files:
        if file.suffix not in (".txt", ".jsonl"):
            raise CalibrationDataError(f"{file} is neither .txt nor .jsonl; pass a .txt file, a .jsonl file or a folder of .txt files")
        text = _read_utf8(file)
        _check_lines(file, text)
        texts.extend(_read_jsonl(file, text) if file.suffix == ".jsonl" else [text])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"{path} holds no text (it is empty or only whitespace); pass a file with some prose")
    return texts


HEAD_MARGIN = 64  # tokens dropped at the end of a tokenised prefix (its cut may change the last few)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _head_ids(tokenizer, text: str, needed: int) -> list[int] | None:
    """The first `needed` token ids of `text`, tokenising only a prefix of it; None if it has too few.

    A long document (the bundled corpus is one 3.9 MB text) is not tokenised
    whole when the budget needs only its beginning: prefixes ending at a line
    break, doubling in length, are tokenised until one gives `needed` +
    HEAD_MARGIN tokens, and its first `needed` are kept. Only the last tokens
    of a prefix can depend on where it was cut (the cut is at a line break, so
    mid-word never), and those HEAD_MARGIN tokens are dropped: the ids are the
    ones tokenising the whole text gives (tested), at a fraction of its time
    and memory.
    """
    chars = max(4 * (needed + HEAD_MARGIN), 4096)
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            return None
        ids = _ids(tokenizer, text[: cut + 1])
        if len(ids) >= needed + HEAD_MARGIN:
            return ids[:needed]
        chars = 2 * (cut + 1)
    return None


def token_windows(tokenizer, texts: list[str], seq_len: int, samples: int | None = None, seed: int = 0,
                  max_tokens: int | None = None) -> torch.Tensor:
    """Cut the texts into [N, seq_len] token windows, N = `samples` picked at random by `seed` (all if None).

    Documents are joined with the tokenizer's end-of-text token, so no window
    needs padding. Windows do not overlap.
    """
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2, got {seq_len}")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    budget = None if max_tokens is None else max_tokens
    if samples is not None:
        # Tokenise no more than needed, with room to pick windows at random.
        budget = samples * seq_len * 8 if budget is None else min(budget, samples * seq_len * 8)
    for text in texts:
        head = None if budget is None else _head_ids(tokenizer, text, budget - len(ids))
        if head is not None:  # this document alone fills the budget: only its beginning was tokenised
            ids.extend(head)
            break
        ids.extend(_ids(tokenizer, text) + separator)
        if budget is not None and len(ids) >= budget:
            ids = ids[:budget]
            break
    count = len(ids) // seq_len
    if count == 0:
        if len(ids) < 2:
            raise CalibrationDataError("the text gives fewer than 2 tokens; pass more text")
        return torch.tensor([ids], dtype=torch.long)
    windows = torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)
    if samples is not None and samples < count:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples]
        windows = windows[order.sort().values]
    return windows


def check_amount(windows: torch.Tensor, samples: int, seq_len: int, warn: bool = True, role: str = "calibration data",
                 option: str = "--calib-data") -> None:
    """Refuse `windows` holding fewer than `MIN_TOKENS` tokens (or than asked, when fewer were asked); with `warn`,
    warn with the numbers when they hold fewer windows or shorter ones than the `samples` × `seq_len` asked."""
    asked, used = samples * seq_len, int(windows.numel())
    floor = min(MIN_TOKENS, asked)
    if used < floor:
        raise CalibrationDataError(f"the {role} gives {used} tokens, fewer than the {floor} ann2snn needs "
                                   f"({samples} windows of {seq_len} tokens were asked); pass more text with {option}")
    if warn and used < asked:
        warnings.warn(f"the {role} gives {windows.shape[0]} window(s) of {windows.shape[1]} tokens ({used} tokens), "
                      f"fewer than the {samples} of {seq_len} ({asked} tokens) asked; pass more text with {option} "
                      "for thresholds that hold on unseen text", TooLittleTextWarning, stacklevel=3)


def calibration_windows(tokenizer, calib_data: str | Path | None, samples: int, seq_len: int, seed: int,
                        warn: bool = True) -> torch.Tensor:
    """The calibration windows: `samples` × `seq_len` tokens of `calib_data` (default: the bundled text), checked
    for amount (`check_amount`)."""
    windows = token_windows(tokenizer, read_texts(calib_data), seq_len, samples, seed)
    check_amount(windows, samples, seq_len, warn)
    return windows


def check_enough_text(tokenizer, texts: list[str], seq_len: int, role: str, option: str) -> None:
    """Refuse text that fills fewer than `MIN_TOKENS` tokens of whole `seq_len`-token windows (tokenising only
    as much as that needs)."""
    windows = token_windows(tokenizer, texts, seq_len, max_tokens=MIN_TOKENS + seq_len)
    used = int(windows.numel())
    if used < MIN_TOKENS:
        raise CalibrationDataError(f"the {role} gives {used} tokens (in windows of {seq_len}), fewer than the "
                                   f"{MIN_TOKENS} ann2snn needs; pass more text with {option}")
