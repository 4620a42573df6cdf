"""Spike codings and the signed neuron: the spikes a neuron fires sum exactly to its quantised input."""

import pytest
import torch

from ann2snn.coding import SpikeCode
from ann2snn.errors import ConfigError
from ann2snn.modules.neuron import DynamicNeuron, SignedNeuron, SpikeTrain


@pytest.mark.parametrize("coding,T,levels", [("rate", 4, 9), ("rate", 32, 65), ("phase", 4, 31), ("phase", 8, 511)])
def test_levels(coding, T, levels):
    assert SpikeCode(coding, T).levels == levels


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_timesteps_must_be_positive_integers(bad):
    with pytest.raises(ConfigError):
        SpikeCode("rate", bad)


@pytest.mark.parametrize("coding", ["rate", "phase"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_spike_count_equals_quantised_input(coding, T):
    code = SpikeCode(coding, T)
    L = code.max_count
    # every half-integer (the ties) and random points, out of range on both sides
    u = torch.cat([torch.arange(-2 * L - 2, 2 * L + 2.5, 0.5), (torch.rand(4000) - 0.5) * 5 * L])
    step = torch.tensor([0.37])
    x = (u * step).reshape(-1, 1)
    neuron = SignedNeuron(code, 1, step)
    neuron.simulation = "step"
    train = neuron(x)
    assert isinstance(train, SpikeTrain)
    assert set(train.spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(train.counts(), code.quantise_counts(x, step))
    assert torch.allclose(train.accumulate(), code.quantise(x, step))
    neuron.simulation = "fast"
    assert torch.allclose(neuron(x), train.accumulate())


def test_quantisation_error_is_half_a_step_in_range():
    code = SpikeCode("phase", 6)
    step = torch.rand(16) + 0.1
    x = (torch.rand(1000, 16) * 2 - 1) * step * code.max_count
    assert ((code.quantise(x, step) - x).abs() <= step / 2 + 1e-6).all()


def test_static_thresholds_make_samples_independent():
    """One sample's spikes never depend on another's; the braintransformers neuron's do."""
    code = SpikeCode("rate", 16)
    quiet = torch.randn(1, 8)
    loud = torch.randn(1, 8) * 100
    static = SignedNeuron(code, 8, torch.full((8,), 0.2))
    assert torch.equal(static(quiet), static(torch.cat([quiet, loud]))[:1])
    dynamic = DynamicNeuron(code)
    assert not torch.equal(dynamic(quiet), dynamic(torch.cat([quiet, loud]))[:1])


def test_ann_simulation_passes_input_through():
    neuron = SignedNeuron(SpikeCode("rate", 4), 3, torch.ones(3))
    neuron.simulation = "ann"
    x = torch.randn(2, 3)
    assert neuron(x) is x


def test_phase_code_past_23_steps_keeps_later_steps_silent():
    code = SpikeCode("phase", 30)
    assert code.max_count == 2**23 - 1 and (code.step_weights()[23:] == 0).all()
    step = torch.tensor([1e-3])
    x = (torch.rand(500, 1) - 0.5) * 2 * code.max_count * 1e-3
    neuron = SignedNeuron(code, 1, step)
    neuron.simulation = "step"
    train = neuron(x)
    assert (train.spikes[23:] == 0).all()
    assert torch.equal(train.counts(), code.quantise_counts(x, step))


@pytest.mark.parametrize("coding", ["rate", "phase"])
def test_fast_rounding_matches_the_neuron_one_float_step_from_a_half(coding):
    """u = x/Δ one float32 step either side of k + 1/2: quantise and the firing neuron give the same count."""
    code = SpikeCode(coding, 6)
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 7.5], dtype=torch.float32)
    u = torch.cat([torch.nextafter(halves, halves - 1), halves, torch.nextafter(halves, halves + 1)])
    step = torch.ones(())
    neuron = SignedNeuron(code, (), step)
    neuron.simulation = "step"
    assert torch.equal(neuron(u).counts(), code.quantise_counts(u, step))
    assert code.quantise_counts(torch.tensor([0.49999997]), step).item() == 0  # floor(u + 1/2) gave 1
