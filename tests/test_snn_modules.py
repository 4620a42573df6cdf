"""Synapsis, SNNMatmul, SNNSoftmax and SNNSiLU: exact against their fake-quantised ANN, with stated bounds."""

import pytest
import torch
import torch.nn.functional as F

from ann2snn.coding import SpikeCode
from ann2snn.modules.attention import SNNSoftmax, SpikingAttention, snn_matmul
from ann2snn.modules.neuron import SignedNeuron, SpikeTrain
from ann2snn.modules.silu import SNNSiLU
from ann2snn.modules.staircase_silu import StaircaseSiLU
from ann2snn.modules.synapsis import Synapsis

CODES = [SpikeCode("rate", 4), SpikeCode("rate", 16), SpikeCode("phase", 4), SpikeCode("phase", 8)]


def _step(module):
    for m in module.modules():
        if hasattr(m, "simulation"):
            m.simulation = "step"
    return module


@pytest.mark.parametrize("code", CODES, ids=lambda c: f"{c.name}{c.timesteps}")
def test_synapsis_equals_linear_of_quantised_input(code):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 12).double()
    delta = torch.rand(24).double() * 0.05 + 0.01
    x = torch.randn(3, 5, 24).double()
    synapsis = _step(Synapsis(linear, code, delta))
    seen = []
    synapsis.synapse.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    expected = F.linear(code.quantise(x, delta), linear.weight, linear.bias)
    assert torch.allclose(synapsis(x), expected, atol=1e-10)
    # what reaches the weights is a spike train: ternary spikes times the channel's threshold
    assert isinstance(seen[0], SpikeTrain) and set(seen[0].spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("code", CODES, ids=lambda c: f"{c.name}{c.timesteps}")
def test_snn_matmul_of_two_trains_equals_product_of_quantised_operands(code):
    torch.manual_seed(1)
    a, b = torch.randn(2, 6, 8).double(), torch.randn(2, 8, 5).double()
    na, nb = SignedNeuron(code, 8, torch.full((8,), 0.1)), SignedNeuron(code, 5, torch.full((5,), 0.1))
    _step(na), _step(nb)
    ta, tb = na(a), nb(b)
    expected = code.quantise(a, na.delta.double()) @ code.quantise(b, nb.delta.double())
    assert torch.allclose(snn_matmul(ta, tb), expected, atol=1e-9)


@pytest.mark.parametrize("code", [SpikeCode("phase", 6), SpikeCode("rate", 8)], ids=lambda c: f"{c.name}{c.timesteps}")
def test_spiking_attention_step_and_fast_give_the_same_bits(code):
    """P·V in units of the steps: step and fast round alike (float32), so an output that lands on the next
    neuron's rounding boundary goes the same way in both. The first query sees one token only: its output is
    that token's quantised v, a multiple of Δ_v (the tie that made them part on Qwen2.5)."""
    torch.manual_seed(3)
    heads, kv_heads, dim, seq = 4, 2, 8, 9
    steps = [torch.rand(h, dim) * 0.05 + 0.02 for h in (heads, kv_heads, kv_heads)]
    attention = SpikingAttention(code, heads, kv_heads, dim, *steps)
    q, k, v = torch.randn(2, heads, seq, dim), torch.randn(2, kv_heads, seq, dim), torch.randn(2, kv_heads, seq, dim)
    mask = torch.ones(seq, seq).tril().bool().expand(2, 1, seq, seq)
    outputs = {}
    for simulation in ("fast", "step"):
        for m in attention.modules():
            m.simulation = simulation
        outputs[simulation] = attention(q, k, v, mask, dim**-0.5)
    assert torch.equal(outputs["step"], outputs["fast"])
    first_v = code.quantise(v[:, :, 0].transpose(0, 1), steps[2].unsqueeze(1)).transpose(0, 1)  # [2, kv_heads, dim]
    assert torch.allclose(outputs["fast"][:, 0], first_v.repeat_interleave(heads // kv_heads, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("coding", ["rate", "phase"])
@pytest.mark.parametrize("T", [1, 2, 4, 8, 16, 32])
def test_snn_softmax_rows_sum_to_one_and_mask_is_respected(coding, T):
    if coding == "phase" and T > 16:
        pytest.skip("phase code is for few steps")
    torch.manual_seed(2)
    scores = torch.randn(2, 3, 7, 7) * 4
    mask = torch.ones(7, 7).tril().bool().expand(2, 1, 7, 7)
    scores_with_huge_masked = scores.masked_fill(~mask, 1e4)  # a masked outlier must not enter the scale
    softmax = _step(SNNSoftmax(SpikeCode(coding, T)))
    train = softmax(scores_with_huge_masked, mask)
    probs = train.accumulate() / train.accumulate().sum(-1, keepdim=True)  # normalised as SpikingAttention does
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 7), atol=1e-5)  # stated tolerance: 1e-5
    assert (train.spikes.abs().sum(0)[~mask.expand(2, 3, 7, 7)] == 0).all()
    # rate-coded positives never need corrective spikes; the phase code may (+2 −1 = 1)
    assert set(train.spikes.unique().tolist()) <= ({0.0, 1.0} if coding == "rate" else {-1.0, 0.0, 1.0})
    # the row's largest probability is never lost, however small T is
    assert (train.counts().amax(-1) == SpikeCode(coding, T).max_count).all()
    # with masked entries ignored the result matches the float softmax as T grows
    if T >= 8:
        exact = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        assert (probs - exact).abs().max() < (0.3 if coding == "rate" else 0.01)


@pytest.mark.parametrize("code", CODES, ids=lambda c: f"{c.name}{c.timesteps}")
def test_snn_silu_follows_silu_over_the_calibrated_range_without_saturation(code):
    clip = torch.tensor([12.0, 40.0])
    silu = _step(SNNSiLU(code, 2, code.delta_for(clip)))
    x = torch.stack([torch.linspace(-12, 12, 5001), torch.linspace(-40, 40, 5001)], -1)
    err = (silu(x) - F.silu(x)).abs()
    assert (err <= silu.error_bound() + 1e-5).all()
    assert silu(torch.tensor([[12.0, 40.0]]))[0, 1] > 39  # no ceiling near 4.97


def test_braintransformers_staircase_saturates_like_the_reference():
    stair = StaircaseSiLU()
    out = stair(torch.tensor([5.0, 10.0, 100.0]))
    assert torch.allclose(out, torch.full((3,), 4.9671), atol=1e-3)
    x = torch.linspace(-6, 1, 7001)
    assert 0.08 < (stair(x) - F.silu(x)).abs().max() < 0.1


@pytest.mark.parametrize("code", [SpikeCode("rate", 8), SpikeCode("phase", 6), SpikeCode("phase", 26)], ids=lambda c: f"{c.name}{c.timesteps}")
@pytest.mark.parametrize("tokens", [1, 40])  # few tokens: Δ goes onto the spikes; many: Δ is folded into W
def test_synapsis_paths_for_few_and_many_tokens_equal_linear_of_quantised_input(code, tokens):
    torch.manual_seed(3)
    linear = torch.nn.Linear(16, 64).double()
    delta = torch.rand(16).double() * 0.05 + 0.01
    x = torch.randn(tokens, 16).double() * 0.5
    synapsis = _step(Synapsis(linear, code, delta))
    delta = synapsis.neuron.delta.double()  # the neuron holds Δ in float32
    expected = F.linear(code.quantise(x, delta), linear.weight, linear.bias)
    assert torch.allclose(synapsis(x), expected, atol=1e-10)


def test_synapsis_step_mode_in_bfloat16_follows_fast_mode():
    torch.manual_seed(4)
    code = SpikeCode("phase", 8)
    linear = torch.nn.Linear(32, 48).bfloat16()
    synapsis = Synapsis(linear, code, torch.rand(32) * 0.02 + 0.01)
    for tokens in (1, 64):
        x = torch.randn(tokens, 32).bfloat16()
        fast = synapsis(x).float()
        step = _step(synapsis)(x).float()
        synapsis.neuron.simulation = "fast"
        assert ((step - fast).abs() <= 0.02 * fast.abs().amax()).all()


def test_neuron_spikes_follow_the_stated_rule_at_and_next_to_the_thresholds():
    """In-place firing = the rule of neuron.py's docstring, step by step, also one ulp either side of ±θ_t."""
    for dtype in (torch.float32, torch.float64):
        code = SpikeCode("phase", 5)
        weights = code.step_weights().to(dtype)
        thetas = torch.where(weights >= 2, weights * 3 / 4, weights / 2)  # written out here, not read from the code
        edges = []
        for theta in thetas.tolist():
            for edge in (theta, -theta):
                e = torch.tensor(edge, dtype=dtype)
                edges += [e, torch.nextafter(e, e - 1), torch.nextafter(e, e + 1)]
        u = torch.cat([torch.stack(edges), torch.arange(-70, 70.5, 0.5, dtype=dtype), torch.randn(500, dtype=dtype) * 20])
        neuron = _step(SignedNeuron(code, (), torch.tensor(1.0)))
        train = neuron(u)
        v, expected = u.clone(), []
        for w, theta in zip(weights, thetas):
            s = ((v >= theta).to(dtype) - (v < -theta).to(dtype)) * (w > 0)
            v = v - s * w
            expected.append(s)
        assert torch.equal(train.spikes, torch.stack(expected))
        inside = u.abs() <= code.max_count
        assert (v[inside] >= -0.5).all() and (v[inside] < 0.5).all()  # what is left is the rounding remainder


@pytest.mark.parametrize("code", [SpikeCode("rate", 4), SpikeCode("phase", 5)], ids=lambda c: f"{c.name}{c.timesteps}")
def test_snn_matmul_shares_key_value_heads_without_repeating_them(code):
    """Grouped-query attention: 4 query heads on 2 key/value heads equals repeat_interleave of the key/value heads."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, 6, 8).double(), torch.randn(2, 2, 8, 7).double()
    nq, nk = _step(SignedNeuron(code, 8, torch.full((8,), 0.1))), _step(SignedNeuron(code, 7, torch.full((7,), 0.1)))
    tq, tk = nq(q), nk(k)
    repeated = tk.map(lambda x: x.repeat_interleave(2, dim=-3))
    assert torch.allclose(snn_matmul(tq, tk), snn_matmul(tq, repeated), atol=1e-10)
    expected = code.quantise(q, nq.delta.double()) @ code.quantise(k, nk.delta.double()).repeat_interleave(2, dim=-3)
    assert torch.allclose(snn_matmul(tq, tk), expected, atol=1e-9)
    assert torch.allclose(snn_matmul(q, k), q @ k.repeat_interleave(2, dim=-3), atol=1e-12)
