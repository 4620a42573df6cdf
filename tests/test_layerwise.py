"""Layer-by-layer conversion writes the export that whole-model conversion writes, one layer in memory at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import ann2snn
from ann2snn.errors import CheckpointError, ConfigError
from ann2snn.layerwise import convert_layer_by_layer

from conftest import SMALL, make_checkpoint, make_tokenizer

OPTIONS = dict(calib_samples=4, seq_len=32, levels="uniform")  # per-site levels need the whole model: both uniform


def _bf16_sharded(folder, tie: bool, model_class=None, config_class=None):
    """A bf16 checkpoint in several shards (as large checkpoints come)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True)
    torch.manual_seed(1)
    model = (model_class or Qwen2ForCausalLM)((config_class or Qwen2Config)(**{**SMALL, "tie_word_embeddings": tie}))
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    make_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _both(folder, tmp_path, **options):
    ann, tokenizer = ann2snn.load_ann(str(folder))
    ann2snn.save(ann2snn.convert(ann, tokenizer, progress=False, **OPTIONS, **options), tmp_path / "whole", tokenizer)
    convert_layer_by_layer(folder, tmp_path / "layers", tokenizer, progress=False, **OPTIONS, **options)
    return tmp_path / "whole", tmp_path / "layers"


def _assert_same_export(whole, layers):
    a, b = ann2snn.load(whole), ann2snn.load(layers)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ca, cb = (json.loads((f / "snn_config.json").read_text()) for f in (whole, layers))
    per_file = ("files", "config_sha256")  # the shards differ, so their hashes and the hash over those do
    # the head's window is measured on hidden states that the two runs compute in different attention code (the
    # calibration pass's, the converted model's with spiking off): the same window, its divergences to rounding
    heads = [config.pop("head") for config in (ca, cb)]
    assert heads[0].keys() == heads[1].keys()
    for whole_head, layers_head in zip(*(head.values() for head in heads)):
        found = [head.pop("divergence", {}) for head in (whole_head, layers_head)]
        assert whole_head == layers_head and found[0] == pytest.approx(found[1], rel=0.05, abs=1e-9)
    assert {k: v for k, v in ca.items() if k not in per_file} == {k: v for k, v in cb.items() if k not in per_file}
    sa, sb = load_file(whole / "calibration.safetensors"), load_file(layers / "calibration.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((whole / "config.json").read_text()) == json.loads((layers / "config.json").read_text())
    return a, b


@pytest.mark.parametrize("tie", [True, False])
def test_layer_by_layer_gives_the_whole_model_export(tmp_path, tie):
    folder = _bf16_sharded(tmp_path / "ckpt", tie)
    whole, layers = _both(folder, tmp_path, timesteps=6)
    a, b = _assert_same_export(whole, layers)
    assert next(b.parameters()).dtype == torch.bfloat16  # the checkpoint's dtype, as dtype="auto"
    # one shard per decoder layer, plus one for the embedding, norm and head
    shards = sorted(p.name for p in layers.glob("model-*.safetensors"))
    assert len(shards) == SMALL["num_hidden_layers"] + 1
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)


def test_layer_by_layer_takes_llama_and_the_recipe_options(tmp_path):
    folder = make_checkpoint(tmp_path / "llama", LlamaConfig, LlamaForCausalLM, seed=3)
    _assert_same_export(*_both(folder, tmp_path, timesteps=4, coding="rate", threshold="max", headroom=1.5))


def test_layer_by_layer_reuses_saved_statistics_as_convert_does(tmp_path, monkeypatch):
    """--calib-stats: no forward at all, and the export whole-model conversion gives from the same statistics."""
    import ann2snn.layerwise as layerwise

    folder = _bf16_sharded(tmp_path / "ckpt", tie=True)
    ann, tokenizer = ann2snn.load_ann(str(folder))
    first = tmp_path / "first"
    ann2snn.save(ann2snn.convert(ann, tokenizer, progress=False, timesteps=4, **OPTIONS), first, tokenizer)
    stats = first / "calibration.safetensors"
    ann, _ = ann2snn.load_ann(str(folder))
    # the head at T: its own window is measured on hidden states, which layer by layer with saved statistics has none of
    ann2snn.save(ann2snn.convert(ann, tokenizer, progress=False, timesteps=9, calib_stats=stats,
                                 levels="uniform", head_steps=0), tmp_path / "whole", tokenizer)
    calls = []
    real = layerwise._layer_inputs
    monkeypatch.setattr(layerwise, "_layer_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(UserWarning, match="lm_head's input neuron gets T=9"):
        convert_layer_by_layer(folder, tmp_path / "layers", tokenizer, timesteps=9, calib_stats=stats, progress=False)
    assert calls == []
    _assert_same_export(tmp_path / "whole", tmp_path / "layers")
    # statistics gathered after a rotation belong to the rotated weights: refused
    ann, _ = ann2snn.load_ann(str(folder))
    ann2snn.save(ann2snn.convert(ann, tokenizer, progress=False, outliers=("rotate",), **OPTIONS), tmp_path / "rot", tokenizer)
    with pytest.raises(CheckpointError, match="gathered with rotate"):
        convert_layer_by_layer(folder, tmp_path / "refused", tokenizer, calib_stats=tmp_path / "rot" / "calibration.safetensors",
                               progress=False)
    assert not (tmp_path / "refused").exists()


def test_layer_by_layer_refuses_outlier_handling_and_leaves_nothing(qwen2_checkpoint, tmp_path):
    _, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    with pytest.raises(ConfigError, match="without outlier handling"):
        convert_layer_by_layer(qwen2_checkpoint, tmp_path / "out", tokenizer, outliers=("rotate",), progress=False, **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_layer_by_layer_conversion_leaves_nothing(qwen2_checkpoint, tmp_path, monkeypatch):
    import ann2snn.layerwise as layerwise

    _, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    calls = {"n": 0}
    real = layerwise.write_shard

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first layer's shard is on disk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(layerwise, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_layer_by_layer(qwen2_checkpoint, tmp_path / "out", tokenizer, progress=False, **OPTIONS)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_cli_layer_by_layer_converts_and_refuses_what_it_cannot_combine(qwen2_checkpoint, tmp_path):
    from click.testing import CliRunner

    from ann2snn.cli import main

    runner = CliRunner()
    base = ["convert", str(qwen2_checkpoint), "--layer-by-layer", "--calib-samples", "4", "--seq-len", "32"]
    result = runner.invoke(main, base + ["--out", str(tmp_path / "snn"), "--timesteps", "6"])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and ann2snn.load(tmp_path / "snn").ann2snn["recipe"]["timesteps"] == 6
    for extra, message in ((["--finetune"], "does not combine with --finetune"),
                           (["--outliers", "auto"], "without outlier handling"),
                           (["--max-ppl-ratio", "1.01"], "same T")):
        result = runner.invoke(main, base + ["--out", str(tmp_path / "refused")] + extra)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "refused").exists()


def test_a_converted_layer_leaves_memory_before_the_next_is_written(tmp_path, monkeypatch):
    """Each layer's weights are freed once its shard is written (no autograd graph or reference keeps them)."""
    import gc
    import weakref

    import ann2snn.layerwise as layerwise

    folder = make_checkpoint(tmp_path / "ckpt", num_hidden_layers=4, tie_word_embeddings=False)
    _, tokenizer = ann2snn.load_ann(str(folder))
    weights: dict[int, list] = {}
    real_apply, real_write = layerwise.apply_recipe, layerwise.write_shard

    def apply(model, recipe, statistics, sinks=None, within=""):
        if within.startswith("model.layers."):  # (the spiking head, converted last, stays in memory with the embedding)
            layer = int(within.rsplit(".", 1)[1])
            weights[layer] = [weakref.ref(m.weight) for m in model.get_submodule(within).modules() if isinstance(m, torch.nn.Linear)]
        return real_apply(model, recipe, statistics, sinks, within)

    alive = []

    def write(folder, tensors, index, count):
        gc.collect()
        alive.append(sum(ref() is not None for layer, refs in weights.items() if layer < index - 1 for ref in refs))
        return real_write(folder, tensors, index, count)

    monkeypatch.setattr(layerwise, "apply_recipe", apply)
    monkeypatch.setattr(layerwise, "write_shard", write)
    convert_layer_by_layer(folder, tmp_path / "out", tokenizer, progress=False, **OPTIONS)
    assert len(alive) == 5 and alive == [0] * 5
