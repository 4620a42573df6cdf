"""Per-channel activation statistics, gathered while the ANN runs.

An observer keeps, for one tensor the SNN will carry as spikes, the running
per-channel maximum of |x| and a seeded reservoir of rows (tokens). The
reservoir gives percentiles and lets a clipping search try thresholds later,
so saved statistics can be reused by any threshold rule without running the
model again.
"""

from __future__ import annotations

import torch

from ..errors import NumericalError


class ChannelObserver:
    def __init__(self, site: str, reservoir: int = 256, seed: int = 0):
        self.site = site
        self.reservoir = reservoir
        self.absmax: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self._priority: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def update(self, x: torch.Tensor, channel_dims: int = 1) -> None:
        """x: [..., *channels] with `channel_dims` trailing channel dimensions."""
        x = x.detach()
        if not torch.isfinite(x).all():
            raise NumericalError(f"NaN or Inf in activations at {self.site} during calibration; the checkpoint or dtype is broken there (try --dtype float32)")
        rows = x.reshape((-1,) + tuple(x.shape[x.dim() - channel_dims:])).float().cpu()
        self.tokens += rows.shape[0]
        peak = rows.abs().amax(0)
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        # Priority reservoir sampling: keep the rows with the largest random keys.
        priority = torch.rand(rows.shape[0], generator=self._generator)
        if self.sample is not None:
            rows = torch.cat((self.sample, rows))
            priority = torch.cat((self._priority, priority))
        keep = min(self.reservoir, rows.shape[0])
        self._priority, index = priority.topk(keep)
        self.sample = rows[index]

    def statistics(self) -> dict[str, torch.Tensor]:
        if self.absmax is None:
            raise RuntimeError(f"observer {self.site} saw no data")
        return {"absmax": self.absmax.clone(), "p99.9": percentile(self.sample, 0.999), "sample": self.sample.clone()}


def percentile(sample: torch.Tensor, q: float) -> torch.Tensor:
    """Per-channel q-quantile of |sample| over its rows."""
    return torch.quantile(sample.abs().reshape(sample.shape[0], -1), q, dim=0).reshape(sample.shape[1:])
