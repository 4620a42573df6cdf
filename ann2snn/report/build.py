"""`build_reports`: an export's report at one or several T, in the order the work is done."""

from __future__ import annotations

from pathlib import Path

import torch

from .energy import CONVENTIONS, EnergyModel, IntegerModel, MemoryModel
from .run import build_report

REPORT_VERSION = 2  # 2: three energy views (energy, energy_integer, memory), shifts per accumulator, causal attention


def build_reports(folder: str | Path, windows: torch.Tensor, timesteps: list[int] | None = None, *,
                  energy: EnergyModel | None = None, integer: IntegerModel | None = None,
                  memory: MemoryModel | None = None, batch_size: int = 4, progress: bool = True,
                  model=None, device_map: str | None = None, data: str | Path | None = None) -> dict:
    """Reports of the export in `folder` at each T (default: its own T), gathered for the writers.

    At the export's own T the export itself runs; any other T is the export
    converted again from its calibration statistics (`ann2snn.rebuild`), which a
    fine-tuned export refuses. Models are placed by `device_map`; `data` names
    the text in the report.
    """
    from .. import load
    from ..rebuild import check_timesteps, rebuild_at

    views = {"energy": energy or EnergyModel(), "integer": integer or IntegerModel(), "memory": memory or MemoryModel()}
    model = model if model is not None else load(folder, device_map=device_map)
    own = model.ann2snn["recipe"]["timesteps"]
    timesteps = list(dict.fromkeys(timesteps or [own]))
    check_timesteps(folder, timesteps)
    runs = []
    for t in timesteps:
        snn = model if t == own else rebuild_at(folder, t, device_map=device_map)
        runs.append(build_report(snn, windows, batch_size=batch_size, progress=progress, **views))
        del snn
    return combine(runs, export=str(folder), primary=own if own in timesteps else timesteps[0], data=data, **views)


def combine(runs: list[dict], *, export: str | None = None, primary: int | None = None,
            energy: EnergyModel | None = None, integer: IntegerModel | None = None,
            memory: MemoryModel | None = None, data: str | Path | None = None) -> dict:
    """One report over several runs (one per T), as the writers take it."""
    from .. import __version__

    first = runs[0]
    return {
        "report_version": REPORT_VERSION, "ann2snn_version": __version__, "export": export,
        "data": str(data) if data is not None else None,
        "recipe": first.get("recipe"), "coding": first.get("coding"),
        "windows": first["windows"], "seq_len": first["seq_len"], "tokens_processed": first["tokens_processed"],
        "tokens_scored": first["tokens_scored"],
        "primary_timesteps": primary if primary is not None else first["timesteps"],
        "energy_convention": (energy or EnergyModel()).describe(),
        "energy_conventions": {"i": (energy or EnergyModel()).describe(), "ii": (integer or IntegerModel()).describe(),
                               "iii": (memory or MemoryModel()).describe()},
        "conventions": CONVENTIONS,
        "runs": runs,
    }
