"""--device-map: checked before loading, and a model placed by accelerate converts and runs through its hooks."""

import pytest
import torch

import ann2snn
from ann2snn.errors import ConfigError
from ann2snn.modules.attention import SpikingAttention
from ann2snn.modules.synapsis import Synapsis
from ann2snn.placement import check_device_map, dispatch, place, plan

accelerate = pytest.importorskip("accelerate")


def _ids(tokenizer):
    return tokenizer("It was the best of times, it was the worst of times.", return_tensors="pt")["input_ids"]


def _per_block_map(model) -> dict:
    """accelerate's block granularity (embedding, each decoder layer, norm, head), every block on the CPU."""
    blocks = [f"model.{name}" for name, _ in model.model.named_children() if name != "layers"]
    blocks += [f"model.layers.{i}" for i in range(len(model.model.layers))] + ["lm_head"]
    return {name: "cpu" for name in blocks}


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "", "auto:2"])
def test_a_bad_device_map_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="neither 'auto' nor a device"):
        check_device_map(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_refused_before_loading():
    with pytest.raises(ConfigError, match="not available on this machine"):
        check_device_map("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_without_gpus_keeps_the_model_on_the_cpu(qwen2_checkpoint):
    model, _ = ann2snn.load_ann(str(qwen2_checkpoint), device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not hasattr(model, "hf_device_map")


def test_a_model_that_needs_disk_is_refused(qwen2_checkpoint):
    model, _ = ann2snn.load_ann(str(qwen2_checkpoint))
    with pytest.raises(ConfigError, match="does not offload to disk"):
        plan(model, max_memory={"cpu": 10_000})


def test_auto_plans_whole_decoder_layers(qwen2_checkpoint):
    model, _ = ann2snn.load_ann(str(qwen2_checkpoint))
    device_map = plan(model, max_memory={"cpu": 10 * 2**30})
    assert set(device_map.values()) == {"cpu"}
    # nothing inside a decoder layer is placed on its own
    assert not any(".layers." in name and name.count(".") > 2 for name in device_map)


def test_conversion_through_accelerate_hooks_matches_and_runs_the_snn_modules(qwen2_checkpoint):
    """A model dispatched block by block (hooks on every decoder layer) converts to the same SNN, and that SNN
    runs ann2snn's modules inside the hooked layers — in step simulation too — and generates."""
    plain, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    placed, _ = ann2snn.load_ann(str(qwen2_checkpoint))
    dispatch(placed, _per_block_map(placed), force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in placed.model.layers)
    options = dict(calib_samples=4, seq_len=32, timesteps=6, progress=False)
    plain = ann2snn.convert(plain, tokenizer, **options)
    placed = ann2snn.convert(placed, tokenizer, **options)
    assert all(hasattr(layer, "_hf_hook") for layer in placed.model.layers)  # conversion kept the placement

    calls = {"synapsis": 0, "attention": 0}
    for module in placed.modules():
        if isinstance(module, Synapsis):
            module.register_forward_hook(lambda *a: calls.__setitem__("synapsis", calls["synapsis"] + 1))
        if isinstance(module, SpikingAttention):
            module.register_forward_hook(lambda *a: calls.__setitem__("attention", calls["attention"] + 1))
    ids = _ids(tokenizer)
    for simulation in ("fast", "step"):
        ann2snn.set_simulation(plain, simulation)
        ann2snn.set_simulation(placed, simulation)
        with torch.no_grad():
            torch.testing.assert_close(placed(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    layers = len(placed.model.layers)
    assert calls == {"synapsis": 2 * (7 * layers + 1), "attention": 2 * layers}  # + the spiking head
    out = placed.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_an_export_loads_placed(qwen2_checkpoint, tmp_path):
    model, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    snn = ann2snn.convert(model, tokenizer, calib_samples=4, seq_len=32, timesteps=6, progress=False)
    ann2snn.save(snn, tmp_path / "snn", tokenizer)
    loaded = ann2snn.load(tmp_path / "snn", device_map="cpu")
    again = place(ann2snn.load(tmp_path / "snn"), "auto")
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["convert", "eval", "generate", "report", "finetune"])
def test_every_command_refuses_a_device_it_cannot_use_in_one_line(command, qwen2_checkpoint, tmp_path):
    from click.testing import CliRunner

    from ann2snn.cli import main

    args = {"convert": [str(qwen2_checkpoint), "--out", str(tmp_path / "out")],
            "eval": [str(tmp_path), "--data", str(tmp_path / "x.txt")],
            "generate": [str(tmp_path), "--prompt", "It was"],
            "report": [str(tmp_path), "--data", str(tmp_path / "x.txt"), "--out", str(tmp_path / "out")],
            "finetune": [str(tmp_path), "--data", str(tmp_path / "x.txt"), "--out", str(tmp_path / "out")]}[command]
    (tmp_path / "x.txt").write_text("Some text to read.")
    result = CliRunner().invoke(main, [command, *args, "--device-map", "cuda:0"])
    assert result.exit_code == 2 and result.output.strip() == \
        "error: device cuda:0 is not available on this machine; use --device-map cpu (or auto)"
    assert not (tmp_path / "out").exists()
