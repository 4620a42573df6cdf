"""Whole-model conversion: spike-driven coverage, exact equivalence, export round trip, generation."""

import json

import pytest
import torch

import ann2snn
from ann2snn.errors import CheckpointError, UnsupportedModelError
from ann2snn.modules.attention import SNNMatmul, SpikingAttention
from ann2snn.modules.neuron import SpikeTrain, set_simulation
from ann2snn.modules.silu import SNNSiLU
from ann2snn.modules.synapsis import Synapsis, SynapticWeights

from conftest import SMALL


def _convert(folder, **options):
    model, tokenizer = ann2snn.load_ann(str(folder))
    options.setdefault("calib_samples", 4)
    options.setdefault("seq_len", 32)
    return ann2snn.convert(model, tokenizer, progress=False, **options), tokenizer


@pytest.fixture(scope="module")
def converted(qwen2_checkpoint):
    return _convert(qwen2_checkpoint, timesteps=6)


def _ids(tokenizer, n=48):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :n]


def test_every_decoder_linear_and_attention_is_replaced(converted):
    model, _ = converted
    layers = SMALL["num_hidden_layers"]
    assert sum(isinstance(m, Synapsis) for m in model.modules()) == 7 * layers
    assert sum(isinstance(m, SpikingAttention) for m in model.modules()) == layers
    assert sum(isinstance(m, SNNSiLU) for m in model.modules()) == layers
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.startswith("model.layers"))


def test_step_simulation_is_spike_driven_everywhere(converted):
    """Hook every synapse input and both operands of both attention products during a real forward pass."""
    model, tokenizer = converted
    seen = {"synapse": 0, "matmul": 0}

    def check_train(x):
        assert isinstance(x, SpikeTrain)
        assert set(x.spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}
        # each step's value is the spike times that step's threshold of the channel
        assert torch.allclose(x.values(), x.spikes * x.thresholds())

    def on_synapse(module, args):
        check_train(args[0])
        seen["synapse"] += 1

    def on_matmul(module, args):
        check_train(args[0]), check_train(args[1])
        seen["matmul"] += 1

    handles = [m.register_forward_pre_hook(on_synapse) for m in model.modules() if isinstance(m, SynapticWeights)]
    handles += [m.register_forward_pre_hook(on_matmul) for m in model.modules() if isinstance(m, SNNMatmul)]
    set_simulation(model, "step")
    try:
        with torch.no_grad():
            model(_ids(tokenizer))
    finally:
        set_simulation(model, "fast")
        for h in handles:
            h.remove()
    layers = SMALL["num_hidden_layers"]
    assert seen == {"synapse": 7 * layers, "matmul": 2 * layers}


def test_converted_model_runs_spiking_attention_not_sdpa(converted, monkeypatch):
    model, tokenizer = converted
    calls = []
    for m in model.modules():
        if isinstance(m, SpikingAttention):
            original = m.forward
            monkeypatch.setattr(m, "forward", lambda *a, _o=original, **k: (calls.append(1), _o(*a, **k))[1])
    with torch.no_grad():
        model(_ids(tokenizer))
    assert len(calls) == SMALL["num_hidden_layers"]


def test_ann_mode_is_the_original_model(qwen2_checkpoint, converted):
    model, tokenizer = converted
    original, _ = ann2snn.load_ann(str(qwen2_checkpoint))
    ids = _ids(tokenizer)
    set_simulation(model, "ann")
    try:
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    finally:
        set_simulation(model, "fast")


@pytest.mark.parametrize("coding,T", [("rate", 16), ("phase", 5)])
def test_step_simulation_equals_fake_quantised_ann(qwen2_checkpoint, coding, T):
    """Exact equivalence: accumulated SNN output = fake-quantised ANN at the same thresholds and levels."""
    model, tokenizer = _convert(qwen2_checkpoint, coding=coding, timesteps=T)
    model.double()
    ids = _ids(tokenizer)
    with torch.no_grad():
        set_simulation(model, "fast")
        fake_quantised = model(ids).logits
        set_simulation(model, "step")
        snn = model(ids).logits
    assert torch.allclose(snn, fake_quantised, atol=1e-6, rtol=0)


def test_export_round_trip_gives_the_same_logits_and_generates(converted, tmp_path):
    model, tokenizer = converted
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    loaded = ann2snn.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    config = json.loads((out / "snn_config.json").read_text())
    assert config["recipe"]["timesteps"] == 6 and config["recipe"]["coding"] == "phase"
    assert "RoPE rotation of q and k" in config["float_operations"]
    assert set(config["files"]) >= {"model.safetensors", "config.json", "calibration.safetensors", "tokenizer.json"}
    generated = loaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, 14)
    # with the key/value cache, generation gives the tokens a full forward pass would
    with torch.no_grad():
        assert loaded(generated[:, :-1]).logits[0, -1].argmax() == generated[0, -1]


def test_llama_checkpoint_converts_with_the_same_rules(llama_checkpoint):
    model, tokenizer = _convert(llama_checkpoint)
    assert sum(isinstance(m, Synapsis) for m in model.modules()) == 7 * SMALL["num_hidden_layers"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids(tokenizer)).logits).all()


def test_same_inputs_and_seed_give_byte_identical_exports(qwen2_checkpoint, tmp_path):
    folders = []
    for name in ("a", "b"):
        model, tokenizer = _convert(qwen2_checkpoint, seed=3)
        folders.append(ann2snn.save(model, tmp_path / name, tokenizer))
    a, b = (sorted(p.name for p in f.iterdir()) for f in folders)
    assert a == b
    for name in a:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_tampered_or_newer_exports_are_refused(converted, tmp_path):
    model, tokenizer = converted
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ann2snn.load(out)
    out2 = ann2snn.save(model, tmp_path / "snn2", tokenizer)
    config = json.loads((out2 / "snn_config.json").read_text())
    config["format_version"] = 99
    (out2 / "snn_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer ann2snn"):
        ann2snn.load(out2)


def test_reused_statistics_give_the_same_conversion(qwen2_checkpoint, converted, tmp_path):
    model, tokenizer = converted
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    again, _ = _convert(qwen2_checkpoint, timesteps=6, calib_stats=out / "calibration.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        ann2snn.load_ann(str(tmp_path))


@pytest.mark.parametrize("outliers", [("rotate",), ("smooth",), ("rotate", "smooth")])
def test_outlier_transforms_keep_the_function_and_replay_from_saved_statistics(qwen2_checkpoint, outliers, tmp_path):
    original, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    ids = _ids(tokenizer)
    with torch.no_grad():
        reference = original(ids).logits
    model, _ = _convert(qwen2_checkpoint, outliers=outliers)
    set_simulation(model, "ann")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-4)  # quantisation off: same function
    set_simulation(model, "fast")
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    again, _ = _convert(qwen2_checkpoint, outliers=outliers, calib_stats=out / "calibration.safetensors")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    loaded = ann2snn.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_threshold_rule_and_headroom_follow_the_level_table_unless_given():
    from ann2snn.errors import ConfigError
    from ann2snn.recipes import get_recipe

    recipe = get_recipe("qwen2")
    chosen = {t: (recipe.with_options(timesteps=t).chosen_threshold, recipe.with_options(timesteps=t).chosen_headroom)
              for t in (4, 6, 8, 16)}
    assert chosen == {4: ("mse", 1.0), 6: ("mse", 1.0), 8: ("max", 2.0), 16: ("max", 4.0)}
    assert recipe.with_options(coding="rate", timesteps=16).chosen_headroom == 1.0  # 33 levels
    explicit = recipe.with_options(timesteps=16, threshold="percentile", headroom=1.5)
    assert (explicit.chosen_threshold, explicit.chosen_headroom) == ("percentile", 1.5)
    assert explicit.summary()["headroom"] == 1.5
    with pytest.raises(ConfigError, match="headroom"):
        recipe.with_options(headroom=0.5)


def test_headroom_widens_every_calibrated_step(qwen2_checkpoint):
    plain, _ = _convert(qwen2_checkpoint, timesteps=8, threshold="max", headroom=1.0, outliers=())
    wide, _ = _convert(qwen2_checkpoint, timesteps=8, threshold="max", headroom=3.0, outliers=())
    steps = {name: buffer for name, buffer in plain.named_buffers() if name.endswith(".delta") and "softmax" not in name}
    assert steps
    for name, buffer in wide.named_buffers():
        if name in steps:
            assert torch.allclose(buffer, 3 * steps[name], rtol=1e-6), name


def test_statistics_of_rotated_weights_are_not_reused_without_the_rotation(qwen2_checkpoint, tmp_path):
    snn, tokenizer = _convert(qwen2_checkpoint, timesteps=6, outliers=("rotate",))
    ann2snn.save(snn, tmp_path / "rotated", tokenizer)
    with pytest.raises(CheckpointError, match="gathered with --outliers rotate; pass --outliers rotate"):
        _convert(qwen2_checkpoint, timesteps=6, outliers=(), calib_stats=tmp_path / "rotated" / "calibration.safetensors")
    again, _ = _convert(qwen2_checkpoint, timesteps=6, outliers=("rotate",),
                        calib_stats=tmp_path / "rotated" / "calibration.safetensors")
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, snn(input_ids=ids).logits, rtol=0, atol=0)
