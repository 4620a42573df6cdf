"""benchmarks/energy.py's counting of spikingjelly's Qwen2 recipe, cross-checked against spikingjelly's own
counters and statistics, and its ½·w_t firing-rule switch."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter

import ann2snn
from ann2snn.coding import SpikeCode
from ann2snn.modules.neuron import SignedNeuron
from ann2snn.calibration.data import bundled_text, read_texts, token_windows
from ann2snn.report import build_report, synapsis_counts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from energy import half_rule  # noqa: E402
from fidelity import spikingjelly_forward, spikingjelly_qwen2  # noqa: E402
from spikingjelly_counts import SpikingjellyCounts, _train, energy_views  # noqa: E402

T = 4


@pytest.fixture(scope="module")
def tiny():
    ann, tokenizer = ann2snn.load_ann("qwen2-tiny")
    windows = token_windows(tokenizer, read_texts(str(bundled_text("heldout.txt"))), 32, max_tokens=64)
    return ann.eval(), tokenizer, windows


@pytest.fixture(scope="module")
def counted_sj(tiny):
    """The recipe at T=4, counted over two windows of 32 tokens, with its encoders' own statistics on."""
    ann, _, windows = tiny
    snn = spikingjelly_qwen2(ann, windows, T, 2)
    snn.set_collect_statistics(True)
    counts = SpikingjellyCounts(snn)
    inputs = {}
    handles = counts.hooks() + [snn.layers[0].down_proj.register_forward_pre_hook(
        lambda m, args: inputs.__setitem__("down_proj", args[0]))]
    macs = MACCounter()
    with torch.no_grad(), DispatchCounterMode([macs]):
        spikingjelly_forward(snn)(windows)
    for handle in handles:
        handle.remove()
    return snn, counts, inputs, macs.get_counts()


def test_spikes_equal_the_encoders_own_statistics(counted_sj):
    snn, counts, _, _ = counted_sj
    own = sum(s["positive_spike_count"] + s["negative_spike_count"] for s in snn.encoder_statistics())
    assert own > 0
    assert counts.counts["spikes"] == own
    value_steps = sum(s["spike_value_count"] for s in snn.encoder_statistics())  # values × T
    assert counts.counts["neuron_updates"] == 2 * value_steps  # two IF neurons per value, every step


def test_down_proj_acs_equal_spikingjellys_synop_counter_on_the_same_spikes(counted_sj):
    snn, _, inputs, _ = counted_sj
    x, weight = inputs["down_proj"], snn.layers[0].down_proj.weight
    synops = SynOpCounter()
    with torch.no_grad(), DispatchCounterMode([synops]):
        for t in range(x.shape[0]):  # each sign's spikes as the {0, 1} tensor SynOpCounter recognises
            F.linear((x[t] > 0).float(), weight)
            F.linear((x[t] < 0).float(), weight)
    ours = synapsis_counts(_train(x), weight, None)["ac"]
    assert ours > 0 and ours == synops.get_total()


def test_float_linear_macs_once_per_step_equal_spikingjellys_mac_counter(counted_sj):
    snn, counts, _, macs = counted_sj
    executed = sum(macs["Qwen2SNNModel.layers.0.q_proj"].values())  # F.linear on the running sum, every step
    q = snn.layers[0].q_proj
    rows = 2 * 32
    assert executed == T * rows * q.in_features * q.out_features
    # counted by non-zero input differences: at most the dense per-step MACs, at least the MACs run once
    assert counts.counts["float_mac_once"] < counts.counts["float_mac"] <= T * counts.counts["float_mac_once"]


def test_energy_views_check_the_anns_macs_and_order_the_schedules(tiny, counted_sj):
    ann, tokenizer, windows = tiny
    _, counts, _, _ = counted_sj
    snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, timesteps=T, calib_samples=4, seq_len=32, progress=False)
    run = build_report(snn, windows, batch_size=2, progress=False)
    as_run = energy_views(counts, int(windows.numel()), run, "as run")
    once = energy_views(counts, int(windows.numel()), run, "once")
    assert 0 < once["i"] < as_run["i"] and 0 < once["ii"] < as_run["ii"]
    assert once["i_spiking_sites"] == as_run["i_spiking_sites"] > 0
    longer = token_windows(tokenizer, read_texts(str(bundled_text("heldout.txt"))), 64, max_tokens=64)
    other = build_report(snn, longer, batch_size=1, progress=False)  # other window length: other MACs per token
    with pytest.raises(ValueError, match="not the ANN's"):
        energy_views(counts, int(windows.numel()), other, "once")


def test_half_rule_keeps_the_snn_exact_with_more_spikes(tiny):
    ann, tokenizer, windows = tiny
    snn = ann2snn.convert(copy.deepcopy(ann), tokenizer, timesteps=6, calib_samples=4, seq_len=32, progress=False)
    minimal = build_report(snn, windows[:1], batch_size=1, progress=False)
    half_rule(snn)
    half = build_report(snn, windows[:1], batch_size=1, progress=False)
    # the same counts (exact, tests/test_coding_and_neuron.py), summed in another order: float32 rounding only
    assert half["ppl_snn"] == pytest.approx(minimal["ppl_snn"], rel=1e-3)
    assert half["totals"]["spikes"] > minimal["totals"]["spikes"]


@pytest.mark.parametrize("T", [1, 4, 8, 12])
def test_half_rule_neuron_fires_every_count_exactly(T):
    code = SpikeCode("phase", T)
    neuron = SignedNeuron(code, (), torch.tensor(1.0))
    half_rule(neuron)
    assert torch.equal(neuron.firing_thresholds, 0.5 * code.step_weights())
    L = code.max_count
    u = torch.arange(-L - 2, L + 3, dtype=torch.float64)
    u = torch.cat([u, u + 0.5, u + 0.25])
    one = torch.tensor(1.0, dtype=torch.float64)
    train = neuron.fire(u, one)
    assert torch.equal(train.counts(), code.quantise_counts(u, one))
    if T >= 4:  # 5 goes as +8 −4 +2 −1 (4 spikes; the minimal rule: +4 +1)
        assert neuron.fire(torch.tensor([5.0], dtype=torch.float64), one).spikes.abs().sum().item() == 4
