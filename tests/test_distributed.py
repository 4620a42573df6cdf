"""Data-parallel calibration under torchrun (gloo, 2 CPU processes) gives one process's statistics."""

import subprocess
import sys

import torch
from click.testing import CliRunner

from ann2snn.calibration.calibrate import load_statistics
from ann2snn.cli import main

ARGS = ["--calib-samples", "6", "--seq-len", "24", "--seed", "5"]


def test_two_process_calibration_merges_to_single_process_statistics(qwen2_checkpoint, tmp_path):
    single = tmp_path / "single"
    assert CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(single)] + ARGS).exit_code == 0
    merged = tmp_path / "merged"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                          "-m", "ann2snn.cli", "convert", str(qwen2_checkpoint), "--out", str(merged)] + ARGS,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    one, _ = load_statistics(single / "calibration.safetensors")
    two, meta = load_statistics(merged / "calibration.safetensors")
    assert set(one) == set(two) and len(one) > 0
    for site in one:
        assert torch.equal(one[site]["absmax"], two[site]["absmax"]), site
        assert torch.equal(one[site]["p99.9"], two[site]["p99.9"]), site
        assert two[site]["sample"].shape == one[site]["sample"].shape
