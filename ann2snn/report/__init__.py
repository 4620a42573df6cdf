"""What a converted SNN does, counted: spikes, synaptic operations, the ANN's MACs, fidelity and energy, three ways.

`build_reports(export, windows, timesteps)` runs the export (and, for other
T, the export rebuilt from its calibration, `ann2snn.rebuild`) as ANN and as
SNN over token windows, and `write_report` writes report.json, report.md and
plots. The package, by job:

- `counting`: spikes, ACs, shifts and neuron updates per spiking module call;
- `floats`: the operations that stay float, by module type;
- `energy`: the three energy views and their conventions;
- `run`: one model run as ANN and SNN, gathered into one run's report;
- `build`: several T into one report;
- `render`: report.json, report.md, plots.
"""

from .build import REPORT_VERSION, build_reports, combine
from .counting import SNN_FIELDS, CountCache, SpikeFieldCounter, matmul_counts, neuron_counts, synapsis_counts
from .energy import (CONVENTIONS, HOROWITZ_45NM, EnergyModel, IntegerModel, MemoryModel, energy_estimate,
                     integer_estimate, memory_traffic)
from .floats import FLOAT_COSTS
from .render import check_out, render_markdown, write_json, write_markdown, write_plots, write_report
from .run import build_report

__all__ = ["REPORT_VERSION", "build_reports", "combine", "build_report", "SNN_FIELDS", "CountCache",
           "SpikeFieldCounter", "matmul_counts", "neuron_counts", "synapsis_counts", "CONVENTIONS", "HOROWITZ_45NM",
           "EnergyModel", "IntegerModel", "MemoryModel", "energy_estimate", "integer_estimate", "memory_traffic",
           "FLOAT_COSTS", "check_out", "render_markdown", "write_json", "write_markdown", "write_plots", "write_report"]
