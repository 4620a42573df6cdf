"""The attention sink kept as constants ('sink' outlier option): function, spikes, export, reuse."""

import pytest
import torch

import ann2snn
from ann2snn.errors import CheckpointError, ConfigError
from ann2snn.modules.attention import SpikingAttention
from ann2snn.modules.neuron import SpikeTrain, set_simulation

from conftest import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2-bos", bos_token_id=0, eos_token_id=0)


def _convert(folder, **options):
    model, tokenizer = ann2snn.load_ann(str(folder))
    options.setdefault("calib_samples", 4)
    options.setdefault("seq_len", 32)
    options.setdefault("outliers", ("sink",))
    return ann2snn.convert(model, tokenizer, progress=False, **options), tokenizer


def _ids(tokenizer):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :40]


@pytest.fixture(scope="module")
def converted(checkpoint):
    return _convert(checkpoint, timesteps=6)


def _attention(model):
    return [m for m in model.modules() if isinstance(m, SpikingAttention)]


def test_sink_acts_as_a_one_token_prefix_and_the_ann_stays_the_original(checkpoint, converted):
    model, tokenizer = converted
    original, _ = ann2snn.load_ann(str(checkpoint))
    ids = _ids(tokenizer)
    prefixed = torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)  # token 0: the checkpoint's bos
    with torch.no_grad():
        plain_logits = original(ids).logits
        prefixed_logits = original(prefixed).logits[:, 1:]
        set_simulation(model, "ann")
        assert torch.allclose(model(ids).logits, plain_logits, atol=1e-5)  # the ANN is the model without prefix
        for attention in _attention(model):  # neurons off, sink on: the prefixed ANN
            attention.simulation = "fast"
        assert torch.allclose(model(ids).logits, prefixed_logits, atol=1e-4)
        assert not torch.allclose(prefixed_logits, plain_logits, atol=1e-2)  # so the check above can fail
    set_simulation(model, "fast")


def test_step_simulation_equals_fake_quantised_ann_with_the_sink(checkpoint):
    model, tokenizer = _convert(checkpoint, coding="phase", timesteps=5)
    model.double()
    ids = _ids(tokenizer)
    seen = []
    handle = _attention(model)[0].softmax.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        set_simulation(model, "fast")
        fake_quantised = model(ids).logits
        set_simulation(model, "step")
        snn = model(ids).logits
    handle.remove()
    assert torch.allclose(snn, fake_quantised, atol=1e-6, rtol=0)
    # the sink's probabilities are spikes too: one more key column than the text has tokens
    assert isinstance(seen[-1], SpikeTrain) and seen[-1].spikes.shape[-1] == ids.shape[1] + 1


def test_sink_constants_survive_export_and_generation_matches_a_full_pass(converted, tmp_path):
    model, tokenizer = converted
    ids = _ids(tokenizer)
    attention = _attention(model)[0]
    assert attention.sink_key.abs().sum() > 0 and attention.sink_value.shape[1] == 1
    with torch.no_grad():
        before = model(ids).logits
    loaded = ann2snn.load(ann2snn.save(model, tmp_path / "snn", tokenizer))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    generated = loaded.generate(ids[:, :8], max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():  # the cache holds only the text's keys; the sink is added at every step
        assert loaded(generated[:, :-1]).logits[0, -1].argmax() == generated[0, -1]


def test_statistics_must_match_the_sink_setting(checkpoint, converted, tmp_path):
    model, tokenizer = converted
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    again, _ = _convert(checkpoint, timesteps=6, calib_stats=out / "calibration.safetensors")
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="sink"):
        _convert(checkpoint, timesteps=6, outliers=(), calib_stats=out / "calibration.safetensors")


def test_sink_needs_a_bos_or_eos_id(qwen2_checkpoint):
    with pytest.raises(ConfigError, match="bos_token_id"):
        _convert(qwen2_checkpoint)


def test_auto_turns_the_sink_on_only_for_massive_first_token_activations(checkpoint, monkeypatch):
    import ann2snn.attention_sink as attention_sink

    model, _ = _convert(checkpoint, outliers=("auto",))
    calibration = model.ann2snn["calibration"]
    assert model.ann2snn["recipe"]["outliers"] == [] and calibration["sink"].startswith("off")
    assert calibration["first_token_ratio"] < attention_sink.MASSIVE_RATIO  # a random model has no attention sink
    monkeypatch.setattr(attention_sink, "first_token_ratio", lambda model, window: 500.0)
    model, _ = _convert(checkpoint, outliers=("auto",))
    assert model.ann2snn["recipe"]["outliers"] == ["sink"] and model.ann2snn["calibration"]["sink"] == "on"
    assert all(attention.sink_tokens == 1 for attention in _attention(model))


def test_first_token_ratio_sees_a_massive_first_token(checkpoint):
    from ann2snn.attention_sink import first_token_ratio

    model, tokenizer = ann2snn.load_ann(str(checkpoint))
    ids = _ids(tokenizer)[0]
    plain = first_token_ratio(model, ids)
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: (args[0] * torch.tensor([1000.0] + [1.0] * (args[0].shape[1] - 1))[None, :, None],))
    try:
        assert first_token_ratio(model, ids) > 100 * plain
    finally:
        handle.remove()
