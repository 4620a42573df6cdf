"""Per-channel activation statistics, gathered while the ANN runs, and merged across processes.

An observer keeps, for one tensor the SNN will carry as spikes:
- the per-channel maximum of |x|;
- the per-channel k largest |x|, k = ⌊N·(1 − 0.999)⌋ + 1 for the N tokens the
  whole calibration will show (known in advance), whose smallest is the exact
  99.9th percentile (nearest rank). Unlike a histogram it merges across
  processes *exactly* (the top k of the union is the top k of the tops);
- a seeded priority reservoir of rows (tokens), from which a clipping search
  can try thresholds later without running the model again. The rows are kept
  in the activations' own dtype when that is a 16-bit float (bf16/fp16
  checkpoints): exactly the values seen, in half the memory of float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import NumericalError

PERCENTILE = 0.999
LOSSLESS_16BIT = (torch.bfloat16, torch.float16)  # reservoir rows of these dtypes are kept as they are


def top_count(tokens: int, q: float = PERCENTILE) -> int:
    """k such that the k-th largest of `tokens` values is their q-quantile (nearest rank)."""
    return int(tokens * (1 - q)) + 1


class ChannelObserver:
    def __init__(self, site: str, expected_tokens: int, reservoir: int = 256, seed: int = 0):
        self.site = site
        self.reservoir = reservoir
        self.k = top_count(expected_tokens)
        self.absmax: torch.Tensor | None = None
        self.top: torch.Tensor | None = None  # [k, *channels], descending
        self.sample: torch.Tensor | None = None
        self._priority: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def update(self, x: torch.Tensor, channel_dims: int = 1) -> None:
        """x: [..., *channels] with `channel_dims` trailing channel dimensions."""
        x = x.detach()
        if not torch.isfinite(x).all():
            raise NumericalError(f"NaN or Inf in activations at {self.site} during calibration; the checkpoint or dtype is broken there (try --dtype float32)")
        raw = x.reshape((-1,) + tuple(x.shape[x.dim() - channel_dims:]))
        rows = raw.float().cpu()
        self.tokens += rows.shape[0]
        magnitude = rows.abs()
        peak = magnitude.amax(0)
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        self.top = _top(magnitude if self.top is None else torch.cat((self.top, magnitude)), self.k)
        # Priority reservoir sampling: keep the rows with the largest random keys.
        priority = torch.rand(rows.shape[0], generator=self._generator)
        kept = raw.cpu() if raw.dtype in LOSSLESS_16BIT else rows  # bf16/fp16 rows as they are: no rounding
        if self.sample is not None and self.sample.dtype != kept.dtype:  # mixed dtypes: float32 holds both exactly
            self.sample, kept = self.sample.float(), rows
        self._priority, self.sample = _keep(priority, kept, self._priority, self.sample, self.reservoir)

    def merge_across_processes(self) -> None:
        """Combine every process's observations (torch.distributed must be initialised)."""
        dist.all_reduce(self.absmax, op=dist.ReduceOp.MAX)
        self.top = _top(torch.cat(_all_gather(self.top)), self.k)
        dtype = self.sample.dtype  # gathered in float32 (exact for bf16/fp16): every backend has it
        priorities, samples = torch.cat(_all_gather(self._priority)), torch.cat(_all_gather(self.sample.float()))
        self._priority, self.sample = _keep(priorities, samples.to(dtype), None, None, self.reservoir)
        tokens = torch.tensor([self.tokens])
        dist.all_reduce(tokens)
        self.tokens = int(tokens)

    def statistics(self) -> dict[str, torch.Tensor]:
        """The site's statistics. They hand over the observer's own tensors (no copy of the reservoir):
        call it once, when the observer is done (`update` rebinds its tensors, it never writes into them)."""
        if self.absmax is None:
            raise RuntimeError(f"observer {self.site} saw no data")
        k = min(top_count(self.tokens), self.top.shape[0])
        top = self.top if k == self.top.shape[0] else self.top[:k].clone()
        return {"absmax": self.absmax, "p99.9": self.top[k - 1].clone(), "top": top,
                "sample": self.sample, "tokens": torch.tensor(self.tokens)}


def _top(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    return magnitude.topk(min(k, magnitude.shape[0]), dim=0).values


def _keep(priority, rows, old_priority, old_rows, size):
    if old_rows is not None:
        priority, rows = torch.cat((old_priority, priority)), torch.cat((old_rows, rows))
    priority, index = priority.topk(min(size, rows.shape[0]))
    return priority, rows[index]


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """all_gather for tensors whose first dimension may differ between processes."""
    size = torch.tensor([tensor.shape[0]])
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [g[: int(n)] for g, n in zip(gathered, sizes)]
