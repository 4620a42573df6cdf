"""Whole-model conversion: spike-driven coverage, exact equivalence, export round trip, generation."""

import json

import pytest
import torch

import ann2snn
from ann2snn.convert import calibrate
from ann2snn.errors import CheckpointError, ConfigError, UnsupportedModelError
from ann2snn.modules.attention import SNNMatmul, SpikingAttention
from ann2snn.modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from ann2snn.modules.silu import SNNSiLU
from ann2snn.modules.synapsis import Synapsis, SynapticWeights
from ann2snn.recipes import get_recipe

from conftest import SMALL, make_checkpoint


def _convert(folder, **options):
    model, tokenizer = ann2snn.load_ann(str(folder))
    options.setdefault("calib_samples", 4)
    options.setdefault("seq_len", 32)
    options.setdefault("levels", "uniform")  # these tests count on every site at T; per-site levels: test_levels.py
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
    assert sum(isinstance(m, Synapsis) for m in model.modules()) == 7 * layers + 1
    assert isinstance(model.lm_head, Synapsis)  # the spiking head (recipe default)
    assert sum(isinstance(m, SpikingAttention) for m in model.modules()) == layers
    assert sum(isinstance(m, SNNSiLU) for m in model.modules()) == layers
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.startswith("model.layers"))


def _rounded_counts(x: torch.Tensor, delta: torch.Tensor, L: int) -> torch.Tensor:
    """The level a neuron must reach, written out here: round half up onto the grid, clamp to ±L."""
    return torch.clamp(torch.floor(x / delta + 0.5), -L, L)


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    """The small Qwen2 with a BOS id, which the attention sink needs."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2-bos", bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("outliers", [(), ("sink",)])
def test_step_simulation_is_spike_driven_everywhere(bos_checkpoint, outliers, monkeypatch):
    """Every consumer module receives spike trains (counted per distinct module), each the right count of its input.

    Consumers: each SynapticWeights, both operands of both SNNMatmul, SNNSiLU's
    input neuron, and with the sink both products with its constants.
    """
    from ann2snn.modules import attention as attention_module

    model, tokenizer = _convert(bos_checkpoint, timesteps=5, outliers=outliers)
    model.double()
    sent: dict[int, torch.Tensor] = {}  # id(train) → the float input its neuron fired it for (counts checked there)
    fed: dict[str, set] = {"synapse": set(), "matmul": set(), "silu": set(), "sink": set()}

    def is_train(x):
        return isinstance(x, SpikeTrain) and set(x.spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}

    def on_neuron(module, args, out):
        assert is_train(out)
        expected = _rounded_counts(args[0].double(), module.delta.double(), module.code.max_count)
        assert torch.equal(out.counts(), expected)  # can fail: a wrong level, a stale or misrouted train
        sent[id(out)] = args[0]

    def on_synapse(module, args):
        assert is_train(args[0]) and id(args[0]) in sent  # the very train an input neuron fired in this pass
        fed["synapse"].add(module)

    def on_matmul(module, args):
        assert is_train(args[0]) and is_train(args[1])
        fed["matmul"].add(module)

    current = []
    for m in model.modules():
        if isinstance(m, SpikingAttention):
            m.register_forward_pre_hook(lambda m, a: current.append(m))
    constant_matmul = attention_module._constant_matmul

    def on_constant(x, constant):
        assert is_train(x)
        fed["sink"].add((current[-1], constant.shape[-1]))  # keys ([D, sink]) and values ([sink, D]) apart
        return constant_matmul(x, constant)

    monkeypatch.setattr(attention_module, "_constant_matmul", on_constant)
    silu_neurons = {m.neuron for m in model.modules() if isinstance(m, SNNSiLU)}
    for m in model.modules():
        if isinstance(m, SignedNeuron):
            m.register_forward_hook(on_neuron)
            if m in silu_neurons:
                m.register_forward_hook(lambda m, a, out: fed["silu"].add(m))
        elif isinstance(m, SynapticWeights):
            m.register_forward_pre_hook(on_synapse)
        elif isinstance(m, SNNMatmul):
            m.register_forward_pre_hook(on_matmul)
    set_simulation(model, "step")
    with torch.no_grad():
        model(_ids(tokenizer))
    layers = SMALL["num_hidden_layers"]
    assert fed["synapse"] == {m for m in model.modules() if isinstance(m, SynapticWeights)} and len(fed["synapse"]) == 7 * layers + 1
    assert fed["matmul"] == {m for m in model.modules() if isinstance(m, SNNMatmul)} and len(fed["matmul"]) == 2 * layers
    assert fed["silu"] == silu_neurons and len(silu_neurons) == layers
    assert len(fed["sink"]) == (2 * layers if outliers else 0)


def test_readers_of_one_tensor_share_one_input_neuron_that_fires_once(converted):
    """q/k/v share one neuron and gate/up another; it fires once per input, and no train outlives the pass."""
    model, tokenizer = converted
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.q_proj.neuron is attention.k_proj.neuron is attention.v_proj.neuron
        assert mlp.gate_proj.neuron is mlp.up_proj.neuron
        assert attention.o_proj.neuron is not attention.q_proj.neuron and mlp.down_proj.neuron is not mlp.up_proj.neuron
        assert (attention.q_proj.neuron.readers, mlp.up_proj.neuron.readers, mlp.down_proj.neuron.readers) == (3, 2, 1)
    calls = []
    synapsis_neurons = {m.neuron for m in model.modules() if isinstance(m, Synapsis)}
    handles = [n.register_forward_hook(lambda m, a, out: calls.append(m)) for n in synapsis_neurons]
    try:
        for simulation in ("step", "fast"):
            calls.clear()
            set_simulation(model, simulation)
            with torch.no_grad():
                model(_ids(tokenizer))
            assert len(calls) == len(set(calls)) == 4 * SMALL["num_hidden_layers"] + 1  # q/k/v, o, gate/up, down; head
    finally:
        set_simulation(model, "fast")
        for h in handles:
            h.remove()
    assert all(n._sent is None for n in synapsis_neurons)


def test_sharing_input_neurons_changes_no_value(qwen2_checkpoint, converted):
    """The readers' calibration statistics are identical, so one shared Δ gives bit-identical logits, both simulations."""
    shared, tokenizer = converted
    separate, _ = _convert(qwen2_checkpoint, timesteps=6, recipe=get_recipe("qwen2").with_options(share_inputs=False))
    assert separate.model.layers[0].self_attn.k_proj.neuron is not separate.model.layers[0].self_attn.q_proj.neuron
    statistics = shared.ann2snn["statistics"]
    for layer in range(SMALL["num_hidden_layers"]):
        for first, other in [("self_attn.q_proj", "self_attn.k_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                             ("mlp.gate_proj", "mlp.up_proj")]:
            a, b = statistics[f"model.layers.{layer}.{first}"], statistics[f"model.layers.{layer}.{other}"]
            assert all(torch.equal(a[key], b[key]) for key in a), (layer, other)
    ids = _ids(tokenizer)
    try:
        for simulation in ("fast", "step"):
            set_simulation(shared, simulation), set_simulation(separate, simulation)
            with torch.no_grad():
                assert torch.equal(shared(ids).logits, separate(ids).logits), simulation
    finally:
        set_simulation(shared, "fast"), set_simulation(separate, "fast")


def test_exports_written_before_shared_neurons_still_load(qwen2_checkpoint, tmp_path):
    """A format-2 export holds one Δ per Synapsis (fine-tuning may have moved them apart): loaded as it was."""
    old_recipe = get_recipe("qwen2").with_options(share_inputs=False, spiking_head=False)
    model, tokenizer = _convert(qwen2_checkpoint, timesteps=6, recipe=old_recipe)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.neuron.delta.mul_(1.25)  # as a fine-tune might have
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    out = ann2snn.save(model, tmp_path / "old", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    del config["recipe"]["share_inputs"], config["recipe"]["spiking_head"]
    config["format_version"] = 2
    (out / "snn_config.json").write_text(json.dumps(config))
    loaded = ann2snn.load(out)
    attention = loaded.model.layers[0].self_attn
    assert attention.k_proj.neuron is not attention.q_proj.neuron and type(loaded.lm_head) is torch.nn.Linear
    assert torch.equal(attention.k_proj.neuron.delta, model.model.layers[0].self_attn.k_proj.neuron.delta)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_spiking_head_is_a_tied_synapsis_through_export_and_can_be_turned_off(qwen2_checkpoint, converted, tmp_path):
    """The head's Synapsis keeps the embedding's weight (one tensor, also after load); off, lm_head stays float."""
    model, tokenizer = converted
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in model.ann2snn["statistics"]  # its input site: the final norm's output
    out = ann2snn.save(model, tmp_path / "snn", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    assert config["recipe"]["spiking_head"] is True and "lm_head" not in config["float_operations"]
    loaded = ann2snn.load(out)
    assert isinstance(loaded.lm_head, Synapsis) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    float_head, _ = _convert(qwen2_checkpoint, timesteps=6, recipe=get_recipe("qwen2").with_options(spiking_head=False),
                             calib_stats=out / "calibration.safetensors")
    assert type(float_head.lm_head) is torch.nn.Linear and "lm_head" in float_head.ann2snn["float_operations"]
    ids = _ids(tokenizer)
    with torch.no_grad():  # the same decoder, only the head's input is quantised in one of them
        hidden = model.model(ids).last_hidden_state
        assert torch.equal(hidden, float_head.model(ids).last_hidden_state)
        delta = model.lm_head.neuron.delta
        expected = _rounded_counts(hidden.double(), delta.double(), 2**6 - 1).float() * delta
        assert torch.allclose(model(ids).logits, float_head.lm_head(expected), atol=1e-5)


def test_a_shared_neuron_is_trained_as_one(qwen2_checkpoint):
    """Fine-tuning's learnable Δ: one per shared neuron, so q/k/v keep one Δ."""
    from ann2snn.finetune.ste import differentiable_neurons

    model, _ = _convert(qwen2_checkpoint, timesteps=4)
    with differentiable_neurons(model) as trainable:
        names = set(trainable.log_deltas)
    assert "model.layers.0.self_attn.q_proj.neuron" in names and "model.layers.0.mlp.gate_proj.neuron" in names
    assert not any(".k_proj." in n or ".v_proj." in n or ".up_proj." in n for n in names)


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
    attention = loaded.model.layers[0].self_attn
    assert attention.q_proj.neuron is attention.k_proj.neuron is attention.v_proj.neuron  # stored once, shared again
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
    assert sum(isinstance(m, Synapsis) for m in model.modules()) == 7 * SMALL["num_hidden_layers"] + 1
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


def test_an_snn_is_not_converted_again(converted):
    """convert works in place: converting the same object twice used to calibrate the first SNN and give a worse
    one without a word."""
    model, tokenizer = converted
    before = {name: t.clone() for name, t in model.state_dict().items()}
    for again in (lambda: ann2snn.convert(model, tokenizer, timesteps=8, progress=False),
                  lambda: calibrate(model, tokenizer, calib_samples=4, seq_len=32, progress=False)):
        with pytest.raises(ConfigError, match="already an SNN.*deepcopy"):
            again()
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


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
