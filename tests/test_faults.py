"""Faults: interrupted converts leave no output and resume from saved statistics; full disks; broken numbers."""

import errno
import json
import os
import shutil
import signal
import sys

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ann2snn
from ann2snn.cli import main
from ann2snn.errors import CheckpointError, NumericalError

from process_markers import start_child, wait_for_marker

# Runs the CLI with one stage slowed down and announced on stderr, so a signal lands inside it.
PAUSED_CLI = """
import sys, time, functools
import ann2snn.calibration.calibrate as calibrate, ann2snn.export as export
stage = sys.argv.pop(1)
def pause(fn, marker):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        result = fn(*a, **k) if marker == "EXPORTING" else None
        print(marker, file=sys.stderr, flush=True)
        time.sleep(60)
        return result if marker == "EXPORTING" else fn(*a, **k)
    return wrapped
if stage == "calibration":
    calibrate.ChannelObserver.update = pause(calibrate.ChannelObserver.update, "CALIBRATING")
else:
    export._write_weights = pause(export._write_weights, "EXPORTING")
from ann2snn.cli import main
main()
"""


def _run_and_signal(stage, sig, checkpoint, out):
    """Run the paused convert, signal it inside `stage`; (exit status, what it printed after the signal)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = start_child([sys.executable, "-c", PAUSED_CLI, stage, "convert", str(checkpoint), "--out", str(out),
                        "--calib-samples", "2", "--seq-len", "16"], env)
    marker = "CALIBRATING" if stage == "calibration" else "EXPORTING"
    seen = wait_for_marker(proc, marker)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert seen, f"the convert never reached {stage} (it crashed or hung first): {rest[-2000:]}"
    return proc.returncode, rest


@pytest.mark.parametrize("stage", ["calibration", "export"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_convert_leaves_no_output_and_resumes(stage, sig, qwen2_checkpoint, tmp_path):
    out = tmp_path / "snn"
    returncode, said = _run_and_signal(stage, sig, qwen2_checkpoint, out)
    assert returncode == 130
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    resume = tmp_path / ".snn.calibration.safetensors"
    # interrupted in calibration: nothing at all; in export: only the calibration statistics, to resume from
    assert leftovers == ([] if stage == "calibration" else [resume.name])
    assert said.strip().splitlines()[-1].startswith("interrupted: ")
    assert (str(resume) in said) == (stage == "export")  # where the kept statistics are is said
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(out), "--calib-samples", "2", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    assert ("resuming" in result.output) == (stage == "export")
    assert (out / "snn_config.json").is_file() and not resume.exists()


def test_a_crash_before_the_marker_fails_the_signal_helper(qwen2_checkpoint, tmp_path, monkeypatch):
    """The helper above must not pass a convert that died at start-up (it once sent its signal to a dead process)."""
    monkeypatch.setattr(sys.modules[__name__], "PAUSED_CLI", "import ann2snn_no_such_module")  # dies at import
    with pytest.raises(AssertionError, match="never reached"):
        _run_and_signal("export", signal.SIGINT, qwen2_checkpoint, tmp_path / "snn")


def test_full_disk_during_export_is_reported_and_leaves_nothing(qwen2_checkpoint, tmp_path, monkeypatch):
    import ann2snn.export as export

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", no_space)
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(tmp_path / "snn"),
                                       "--calib-samples", "2", "--seq-len", "16"])
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "free disk space" in result.output
    assert not (tmp_path / "snn").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_nan_in_activations_names_the_layer(qwen2_checkpoint):
    model, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(NumericalError, match="model.layers.1"):
        ann2snn.convert(model, tokenizer, calib_samples=2, seq_len=16, progress=False)


@pytest.mark.parametrize("layer_by_layer", [False, True])
@pytest.mark.parametrize("damage", ["nan_weight", "wrong_shape", "index_names_missing_shard"])
def test_damaged_checkpoints_are_refused(damage, layer_by_layer, qwen2_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen2_checkpoint, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    if damage == "nan_weight":
        weights[name][0, 0] = float("nan")
        save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    elif damage == "wrong_shape":
        weights[name] = weights[name][:, :-1].contiguous()
        save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    else:
        (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {name: "model-00002-of-00002.safetensors"}}))
    with pytest.raises((CheckpointError, NumericalError), match=name if damage != "index_names_missing_shard" else "model-00002"):
        if layer_by_layer:
            from ann2snn.layerwise import convert_layer_by_layer

            convert_layer_by_layer(broken, tmp_path / "out", ann2snn.load_tokenizer(broken), calib_samples=2,
                                   seq_len=16, progress=False)
        else:
            ann2snn.load_ann(str(broken))
    assert not (tmp_path / "out").exists()


def test_remote_code_is_refused_unless_trusted(qwen2_checkpoint, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(qwen2_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        ann2snn.load_ann(str(folder))


def test_one_enormous_line_is_refused(tmp_path):
    from ann2snn.calibration.data import MAX_LINE_CHARS, read_texts
    from ann2snn.errors import CalibrationDataError

    path = tmp_path / "huge.txt"
    path.write_text("word " * (MAX_LINE_CHARS // 5 + 10))
    with pytest.raises(CalibrationDataError, match="split it into lines"):
        read_texts(path)
