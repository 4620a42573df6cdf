"""Spike codings and the signed neuron: the spikes a neuron fires sum exactly to its quantised input."""

import itertools

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


def _fire(code: SpikeCode, u: torch.Tensor):
    """The neuron's train for inputs u in units of Δ (Δ = 1, float64: half-integers up to 2^24 are exact)."""
    neuron = SignedNeuron(code, (), torch.tensor(1.0))
    return neuron.fire(u, torch.tensor(1.0, dtype=torch.float64))


def _timesteps_up_to_23():
    # the whole grid doubles with each phase step: from T = 19 on (1M+ levels) it is a slow test
    return [pytest.param(T, marks=pytest.mark.slow) if T >= 19 else T for T in range(1, 24)]


@pytest.mark.parametrize("coding", ["rate", "phase"])
@pytest.mark.parametrize("T", _timesteps_up_to_23())
def test_every_integer_tie_and_point_between_fires_its_quantised_count(coding, T):
    """Exhaustive: each integer of the grid and beyond ±L, each tie k + ½ and points between, for both codings."""
    code = SpikeCode(coding, T)
    L = code.max_count
    one = torch.tensor(1.0, dtype=torch.float64)
    grid = torch.arange(-L - 3, L + 4, dtype=torch.float64)
    torch.manual_seed(T)
    for k in torch.split(grid, 1 << 20):
        ties = k + 0.5
        u = torch.cat([k, ties, torch.nextafter(ties, ties - 1), torch.nextafter(ties, ties + 1), k + torch.rand_like(k)])
        train = _fire(code, u)
        assert torch.equal(train.counts(), code.quantise_counts(u, one))
    assert code.quantise_counts(torch.tensor([L + 0.5, -L - 0.5, 10.0 * L, -10.0 * L]), one).tolist() == [L, -L, L, -L]


@pytest.mark.parametrize("T", range(1, 10))
def test_phase_code_sends_every_count_with_the_fewest_spikes(T):
    """θ_t = ¾·w_t gives each count the fewest spikes of any signed train with these weights (all 3^T trains)."""
    code = SpikeCode("phase", T)
    L = code.max_count
    trains = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=T)))
    counts = (trains @ code.step_weights()).long()
    fewest = torch.full((2 * L + 1,), float(T + 1)).scatter_reduce(0, counts + L, trains.abs().sum(1), reduce="amin")
    train = _fire(code, torch.arange(-L, L + 1, dtype=torch.float64))
    assert torch.equal(train.spikes.abs().sum(0).float(), fewest)
    if T >= 4:  # the example: 5 as +4 +1 (2 spikes), not +8 −4 +2 −1
        five = _fire(code, torch.tensor([5.0], dtype=torch.float64))
        assert five.spikes.abs().sum().item() == 2


def test_firing_thresholds_are_three_quarters_of_each_weight_and_one_half_for_unit_weights():
    assert torch.equal(SpikeCode("rate", 5).firing_thresholds(), torch.full((5,), 0.5))
    assert SpikeCode("phase", 4).firing_thresholds().tolist() == [6.0, 3.0, 1.5, 0.5]


def test_no_activation_sized_state_outlives_a_forward():
    """Each call is a whole window: after firing, the neuron holds only its buffers (Δ, w_t, θ_t)."""
    code = SpikeCode("phase", 6)
    neuron = SignedNeuron(code, 64, torch.full((64,), 0.1))
    before = {name: t.data_ptr() for name, t in neuron.named_buffers()}
    for simulation in ("step", "fast"):
        neuron.simulation = simulation
        neuron(torch.randn(8, 16, 64))
        assert neuron._sent is None  # one reader: no train waits to be handed on
        assert not any(isinstance(value, torch.Tensor) for value in vars(neuron).values())  # no stray membrane
        assert {name: t.data_ptr() for name, t in neuron.named_buffers()} == before
        assert all(t.numel() <= 64 for t in neuron.buffers())
