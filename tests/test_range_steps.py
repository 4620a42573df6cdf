"""Range steps: high-order phase steps in front of a site's window, so values past the clip still pass."""

import json

import pytest
import torch

import ann2snn
from ann2snn.calibration.thresholds import MAX_RANGE_STEPS, range_steps
from ann2snn.coding import SpikeCode
from ann2snn.errors import ConfigError
from ann2snn.modules.attention import snn_matmul
from ann2snn.modules.neuron import SignedNeuron, set_simulation


def test_range_steps_multiply_the_largest_value_and_keep_the_resolution():
    base = SpikeCode("phase", 8)
    wide = base.with_range_steps(3)
    clip = torch.tensor([2.5])
    assert wide.timesteps == 11 and wide.range_steps == 3
    assert torch.allclose(wide.max_count * wide.delta_for(clip), 8 * clip)  # 2^3 × the clip
    assert wide.delta_for(clip) <= base.delta_for(clip) <= wide.delta_for(clip) * (1 + 2**-8)
    # past 23 weighted steps the window stops growing and Δ coarsens instead: the range is still 2^k × the clip
    capped = SpikeCode("phase", 22).with_range_steps(4)
    assert capped.timesteps == 23 and torch.allclose(capped.max_count * capped.delta_for(clip), 16 * clip)
    assert SpikeCode("phase", 32).with_range_steps(2).timesteps == 32
    with pytest.raises(ConfigError, match="phase"):
        SpikeCode("rate", 8).with_range_steps(1)


def test_range_steps_are_silent_below_half_the_clip_and_the_count_stays_exact():
    code = SpikeCode("phase", 6).with_range_steps(3)
    clip = torch.tensor([1.0])
    delta = code.delta_for(clip)
    x = torch.cat([torch.linspace(-9.0, 9.0, 4001), torch.tensor([0.4999, -0.4999])]).reshape(-1, 1)
    neuron = SignedNeuron(code, 1, delta)
    neuron.simulation = "step"
    train = neuron(x)
    assert torch.equal(train.counts(), code.quantise_counts(x, delta))
    inside = x.abs() <= 8 * clip - delta / 2  # 2^3 × the clip, to the last level
    assert torch.allclose(train.accumulate()[inside], x[inside], atol=delta.item() / 2 + 1e-6)
    ordinary = (x.abs() < 0.5 * clip).squeeze(1)
    assert not train.spikes[:3, ordinary].any()  # the range steps cost no spikes for ordinary values


def test_spike_products_of_unequal_windows_are_exact():
    torch.manual_seed(0)
    plain, wide = SpikeCode("phase", 4), SpikeCode("phase", 4).with_range_steps(2)
    a_neuron = SignedNeuron(plain, 5, torch.full((5,), 0.1))
    b_neuron = SignedNeuron(wide, 3, torch.full((3,), 0.05))
    a_neuron.simulation = b_neuron.simulation = "step"
    a, b = a_neuron(torch.randn(2, 4, 5)), b_neuron(torch.randn(2, 5, 3) * 3)
    assert a.timesteps == 4 and b.timesteps == 6
    expected = a.accumulate().double() @ b.accumulate().double()
    for x, y, want in ((a, b, expected), (b.map(lambda t: t.transpose(-1, -2)), a.map(lambda t: t.transpose(-1, -2)),
                                          expected.transpose(-1, -2))):
        assert torch.allclose(snn_matmul(x, y).double(), want, atol=1e-5)


def test_auto_gives_range_steps_only_to_heavy_tailed_sites():
    phase = SpikeCode("phase", 8)
    light = {"absmax": torch.tensor([2.0, 3.0]), "p99.9": torch.tensor([1.0, 1.5])}
    heavy = {"absmax": torch.tensor([2.0, 60.0]), "p99.9": torch.tensor([1.0, 3.0])}  # one channel's max is 20× its p99.9
    assert range_steps(light, "auto", phase) == 0
    assert range_steps(heavy, "auto", phase) == 6  # log2(20) → 5, one more for what calibration did not see
    assert range_steps({"absmax": torch.tensor([1e6]), "p99.9": torch.tensor([0.0])}, "auto", phase) == MAX_RANGE_STEPS
    assert range_steps(light, 3, phase) == 3
    assert range_steps(heavy, "auto", SpikeCode("rate", 8)) == 0


@pytest.mark.parametrize("option", ["x", -1, MAX_RANGE_STEPS + 1, 1.5, True])
def test_bad_range_step_options_are_refused(option):
    with pytest.raises(ConfigError, match="range steps"):
        ann2snn.convert(None, recipe="qwen2", range_steps=option)


def test_step_simulation_equals_fast_with_range_steps_and_the_export_keeps_them(qwen2_checkpoint, tmp_path):
    model, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    snn = ann2snn.convert(model, tokenizer, timesteps=5, range_steps=2, levels="uniform", calib_samples=4, seq_len=32,
                          progress=False)
    neurons = {n: m for n, m in snn.named_modules() if isinstance(m, SignedNeuron)}
    assert {m.code.timesteps for n, m in neurons.items() if "softmax" not in n} == {7}
    assert {m.code.timesteps for n, m in neurons.items() if "softmax" in n} == {5}  # probabilities keep T: unequal windows in P·V
    ids = tokenizer("It was the best of times, it was the worst of times.", return_tensors="pt")["input_ids"]
    snn.double()
    with torch.no_grad():
        set_simulation(snn, "fast")
        fast = snn(ids).logits
        set_simulation(snn, "step")
        assert torch.allclose(snn(ids).logits, fast, atol=1e-6, rtol=0)
    snn.float()
    set_simulation(snn, "fast")
    with torch.no_grad():
        before = snn(ids).logits
    out = ann2snn.save(snn, tmp_path / "snn", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    assert config["recipe"]["range_steps"] == 2 and set(config["range_steps"].values()) == {2}
    # every site but the two softmax neurons (q/k/v and gate/up are sites of their own, though one neuron fires for each group)
    readers = sum(getattr(m, "readers", 1) for n, m in neurons.items() if "softmax" not in n)
    assert len(config["range_steps"]) == readers
    loaded = ann2snn.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
        # with the key/value cache (a one-token query against cached keys), generation gives what a full pass gives
        generated = loaded.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert loaded(generated[:, :-1]).logits[0, -1].argmax() == generated[0, -1]
