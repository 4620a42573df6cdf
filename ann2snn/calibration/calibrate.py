"""The calibration pass: run the ANN over token windows and gather statistics at every site the recipe needs.

Statistics are a dict site → {"absmax", "p99.9", "top", "sample", "tokens"} and are saved as
`calibration.safetensors` in the export, so a later convert can reuse them
(`--calib-stats`) with any threshold rule, coding or T.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..attention_sink import prepend_sink
from ..errors import CheckpointError
from ..recipes.base import Recipe
from ..replace import CALIBRATION_ATTENTION, REPLACEMENTS, matches
from .observers import ChannelObserver

STATISTICS = ("absmax", "p99.9", "top", "sample", "tokens")
OPTIONAL_STATISTICS = ("absmax_before_smoothing",)
WINDOWS = "windows"  # the calibration summary's token windows [N, L], kept beside the statistics
PROBE = "probe_windows"  # and the probe text's (calibration.data.probe_windows), which per-site levels check too
TOKEN_WINDOWS = (WINDOWS, PROBE)


def _observing_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention that first shows q (after RoPE), k and v to the layer's observers."""
    observers = getattr(module, "ann2snn_observers", None)
    if observers is not None:
        for part, tensor in zip("qkv", (query, key, value)):
            observers[part].update(tensor.transpose(1, 2), channel_dims=2)  # channels: (heads, head_dim)
    sink = getattr(module, "ann2snn_sink", None)
    if sink is not None:  # the SNN's constant prefix (attention_sink.py): attended, never observed
        key, value, attention_mask = prepend_sink(key, value, attention_mask, *sink, query.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CALIBRATION_ATTENTION, _observing_attention)
AttentionMaskInterface.register(CALIBRATION_ATTENTION, sdpa_mask)


@torch.no_grad()
def collect_statistics(model, recipe: Recipe, windows: torch.Tensor, batch_size: int = 4,
                       reservoir: int = 256, seed: int = 0, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Run `model` (the ANN) over `windows` [N, L] and return per-site statistics.

    Under torch.distributed (e.g. `torchrun`), each process calibrates on its
    share of the windows (every world_size-th) and the statistics are merged:
    max and percentile exactly as one process would find them on all windows.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    total_tokens = int(windows.numel())
    if distributed:
        windows = windows[dist.get_rank()::dist.get_world_size()]
        seed = seed + dist.get_rank()  # independent reservoirs, merged by priority
    found = matches(model, recipe)
    device = next(model.parameters()).device
    extra = _skip_logits(model, found)
    with observing(model, found, total_tokens, reservoir, seed) as observers:
        if not observers:
            return {}
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibrating", unit="batch", disable=not progress):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False, **extra)
    if distributed:
        for observer in observers.values():
            observer.merge_across_processes()
    return hand_over(observers)


@contextlib.contextmanager
def observing(model, found: list, total_tokens: int, reservoir: int = 256, seed: int = 0):
    """Observers on the sites of `found` (from `matches`), with the calibration attention on; yields {site: observer}.

    `total_tokens`: how many tokens the observers will see in all (it sizes the
    percentile's top-k). Run the model (or some of its layers) inside the block.
    """
    observers: dict[str, ChannelObserver] = {}
    handles = []
    for name, module, rule in found:
        replacement = REPLACEMENTS[rule.replace_with]
        for site in replacement.sites(name, module):
            observers[site] = ChannelObserver(site, total_tokens, reservoir, seed)
        handles += replacement.observe(name, module, observers)
    # after each observed module: hand the heap's freed blocks back, or glibc's fragmentation grows the
    # resident memory by every layer's transients until the batch ends (measured: +60 MB a layer at 3B shape)
    handles += [module.register_forward_hook(lambda *_: trim_heap()) for _, module, _ in found]
    previous = model.config._attn_implementation
    model.config._attn_implementation = CALIBRATION_ATTENTION
    try:
        yield observers
    finally:
        model.config._attn_implementation = previous
        for handle in handles:
            handle.remove()
        for _, module, _ in found:
            if hasattr(module, "ann2snn_observers"):
                del module.ann2snn_observers


def hand_over(observers: dict[str, ChannelObserver]) -> dict[str, dict[str, torch.Tensor]]:
    """The observers' statistics; each observer goes as its statistics come, so no reservoir is held twice."""
    statistics = {}
    for site in list(observers):
        statistics[site] = observers.pop(site).statistics()
    release_memory()
    return statistics


def _skip_logits(model, found) -> dict:
    """``logits_to_keep=1`` when the model takes it and no observed module is its output layer.

    Calibration reads activations inside the decoder and never the logits; over a
    150k-word vocabulary they are the forward's largest activation (batch ×
    length × vocabulary) and a tenth of a 3B model's compute.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or any(module is head for _, module, _ in found):
        return {}
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; Linux only, a no-op elsewhere).

    Calibration frees many activation-sized blocks between long-lived reservoir
    rows; glibc keeps the freed pages mapped, so without this the process's
    resident memory climbs through every forward pass and stays at its high-water
    mark through the rest of the conversion.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory() -> None:
    """Collect garbage, then `trim_heap`."""
    gc.collect()
    trim_heap()


def save_statistics(statistics: dict, path: Path, metadata: dict) -> None:
    """Write the statistics, and the calibration summary `metadata` with its token windows (TOKEN_WINDOWS) as tensors."""
    tensors = {f"{site}/{key}": value.contiguous() for site, stats in statistics.items() for key, value in stats.items()}
    tensors.update({key: metadata[key].contiguous() for key in TOKEN_WINDOWS if key in metadata})
    summary = {key: value for key, value in metadata.items() if key not in TOKEN_WINDOWS}
    save_file(tensors, str(path), metadata={"ann2snn": json.dumps(summary, sort_keys=True)})
    del tensors
    release_memory()  # whatever the writer allocated (older safetensors copy every tensor to bytes)


def load_statistics(path: str | Path) -> tuple[dict, dict]:
    """(statistics, metadata) from a calibration.safetensors file; metadata[WINDOWS] / [PROBE]: the token windows
    of the calibration and probe texts, when the file holds them (saved since per-site levels and since the probe;
    calibration/levels.py runs on them)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"calibration statistics {path} do not exist; pass the calibration.safetensors of an earlier convert")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("ann2snn", "{}"))
    except (SafetensorsError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"calibration statistics {path} cannot be read ({exc}); run the convert without --calib-stats") from None
    for key in TOKEN_WINDOWS:
        windows = tensors.pop(key, None)
        if windows is None:
            continue
        if windows.dim() != 2 or windows.numel() == 0 or windows.is_floating_point() or int(windows.min()) < 0:
            raise CheckpointError(f"calibration statistics {path} hold token windows that are not token ids; recalibrate")
        metadata[key] = windows
    statistics: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        site, _, stat = key.rpartition("/")
        if stat not in STATISTICS + OPTIONAL_STATISTICS or not site:
            raise CheckpointError(f"calibration statistics {path} hold an unknown entry {key!r}; it is not an ann2snn file")
        statistics.setdefault(site, {})[stat] = value
    for site, stats in statistics.items():
        missing = set(STATISTICS) - set(stats)
        if missing:
            raise CheckpointError(f"calibration statistics {path} lack {', '.join(sorted(missing))} for {site}; recalibrate")
        if not all(v.is_floating_point() or k == "tokens" for k, v in stats.items()) or not all(torch.isfinite(v).all() for v in stats.values()):
            raise CheckpointError(f"calibration statistics {path} hold non-numbers at {site}; recalibrate")
        channels = stats["absmax"].shape
        shapes_agree = (stats["p99.9"].shape == channels and stats["sample"].shape[1:] == channels
                        and stats["top"].shape[1:] == channels and stats["sample"].dim() >= 2 and stats["top"].shape[0] >= 1
                        and stats["tokens"].numel() == 1 and int(stats["tokens"]) >= stats["top"].shape[0]
                        and stats.get("absmax_before_smoothing", stats["absmax"]).shape == channels)
        if not shapes_agree:
            raise CheckpointError(f"calibration statistics {path} have inconsistent shapes at {site}; recalibrate")
    return statistics, metadata
