"""The pipeline as a library call (what the CLI runs), and the promises a new user tested (issue 17):
nothing of the user's replaced or lost, the output checked before the work, a modified configuration
refused, too little text refused or warned about, one line instead of a traceback."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import ann2snn
from ann2snn.calibration.data import MIN_TOKENS, TooLittleTextWarning, bundled_text
from ann2snn.cli import main
from ann2snn.errors import CheckpointError, ConfigError, Interrupted
from process_markers import start_child, wait_for_marker

UNSEEN = str(bundled_text("unseen.txt"))
SMALL_CALIBRATION = ["--calib-data", UNSEEN, "--calib-samples", "2", "--seq-len", "16"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(qwen2_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "snn"
    result = run("convert", qwen2_checkpoint, "--out", out, *SMALL_CALIBRATION, "--timesteps", 6)
    assert result.exit_code == 0, result.output
    return out


# --- one pipeline for the CLI and the Python API (issue 18.1) -------------------------------------------

def test_python_api_runs_the_same_resumable_pipeline_as_the_cli(qwen2_checkpoint, tmp_path, monkeypatch):
    import ann2snn.export as export

    options = dict(calib_data=UNSEEN, calib_samples=2, seq_len=16, timesteps=6, seed=1)
    cli = tmp_path / "cli"
    result = run("convert", qwen2_checkpoint, "--out", cli, *SMALL_CALIBRATION, "--timesteps", 6, "--seed", 1)
    assert result.exit_code == 0, result.output

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    api = tmp_path / "api"
    with monkeypatch.context() as patch:
        patch.setattr(export, "_write_weights", disk_full)
        with pytest.raises(CheckpointError, match="No space left on device.*free disk space"):
            ann2snn.convert_and_export(qwen2_checkpoint, api, progress=False, **options)
    resume = tmp_path / ".api.calibration.safetensors"
    assert not api.exists() and resume.is_file()  # the failed export kept the statistics, nothing else

    summary = ann2snn.convert_and_export(qwen2_checkpoint, api, progress=False, **options)
    assert summary["resumed"] == ["calibration"] and summary["out"] == str(api) and not resume.exists()
    assert summary["recipe"]["timesteps"] == 6 and summary["finetune"] is None
    names = sorted(p.name for p in cli.iterdir())
    assert names == sorted(p.name for p in api.iterdir())
    for name in names:  # the resumed API export is the CLI's, byte for byte
        assert (api / name).read_bytes() == (cli / name).read_bytes(), name


# --- --overwrite and the output location (17.1, 17.2) ---------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_an_export(qwen2_checkpoint, tmp_path):
    mine = tmp_path / "mydocs"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    line = one_error_line(run("convert", qwen2_checkpoint, "--out", mine, "--overwrite", *SMALL_CALIBRATION))
    assert "not an ann2snn export" in line and "thesis.txt" in line
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_overwrite_refuses_a_plain_file_and_keeps_it(qwen2_checkpoint, tmp_path):
    mine = tmp_path / "notes"
    mine.write_text("mine")
    line = one_error_line(run("convert", qwen2_checkpoint, "--out", mine, "--overwrite", *SMALL_CALIBRATION))
    assert "is a file" in line
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # nothing hidden


def test_overwrite_replaces_an_export_or_an_empty_folder(qwen2_checkpoint, exported, tmp_path):
    import shutil

    empty, again = tmp_path / "empty", tmp_path / "again"
    empty.mkdir()
    shutil.copytree(exported, again)
    (again / "model.safetensors").write_bytes(b"damaged")  # still an export (its snn_config.json reads as one)
    for out in (empty, again):
        result = run("convert", qwen2_checkpoint, "--out", out, "--overwrite", *SMALL_CALIBRATION, "--timesteps", 6)
        assert result.exit_code == 0 and result.stdout.startswith("converted "), result.output
        assert ann2snn.load(out).ann2snn["recipe"]["timesteps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "empty"]  # no .old or .partial left


def test_atomic_folder_replacing_a_file_succeeds_and_leaves_nothing_hidden(tmp_path):
    from ann2snn.atomic import atomic_folder

    target = tmp_path / "target"
    target.write_text("old")
    with atomic_folder(target, CheckpointError, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert (target / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_save_refuses_to_overwrite_what_is_not_an_export(exported, tmp_path):
    model = ann2snn.load(exported)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an ann2snn export"):
        ann2snn.save(model, mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "mine"


def test_an_out_below_a_file_is_refused_before_loading(qwen2_checkpoint, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(ann2snn, "load_ann", no_loading)
    (tmp_path / "file").write_text("x")
    line = one_error_line(run("convert", qwen2_checkpoint, "--out", tmp_path / "file" / "sub" / "snn"))
    assert "is a file, not a folder" in line and "free disk space" not in line


def _obey_folder_modes():
    """preexec_fn: a root child loses the capabilities that let it write into any folder (prctl PR_CAPBSET_DROP of
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, applied at exec), so it meets a read-only folder as a user does."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unwritable_out_is_refused_before_any_work_with_its_real_cause(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "ann2snn.cli", "convert", "qwen2-tiny", "--out", str(locked / "sub" / "snn")],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120,
                              preexec_fn=_obey_folder_modes)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Permission denied" in lines[0] and "free disk space" not in lines[0], done.stderr
        assert time.monotonic() - started < 60 and list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("code,disk", [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EBUSY, False),
                                       (errno.EACCES, False), (errno.EROFS, False)])
def test_write_errors_name_their_cause_and_advise_disk_space_only_when_it_is_short(code, disk, tmp_path):
    from ann2snn.atomic import as_os_error, write_failure

    message = write_failure(tmp_path / "snn", OSError(code, os.strerror(code)))
    assert os.strerror(code) in message and ("free disk space" in message) == disk
    wrapped = as_os_error(RuntimeError(f"Error while serializing: I/O error: x (os error {code})"))
    assert wrapped.errno == code  # safetensors' own error carries the OS error too


# --- the configuration is covered by the integrity check (17.3) ----------------------------------------

def _edit_config(folder: Path, rehash: bool = False, **recipe):
    from ann2snn.export import CONFIG_HASH, config_digest

    path = folder / "snn_config.json"
    config = json.loads(path.read_text())
    config["recipe"].update(recipe)
    if rehash:
        config[CONFIG_HASH] = config_digest(config)
    path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("edit", [{"timesteps": 4}, {"coding": "rate"}, {"headroom": 3.0}])
def test_an_edited_snn_config_is_refused(edit, exported, tmp_path):
    import shutil

    copy = shutil.copytree(exported, tmp_path / "edited")
    _edit_config(copy, **edit)
    with pytest.raises(CheckpointError, match="does not match its own SHA-256"):
        ann2snn.load(copy)
    line = one_error_line(run("generate", copy, "--prompt", "It was", "--max-new-tokens", 2))
    assert "snn_config.json" in line


@pytest.mark.parametrize("edit,named", [({"timesteps": 0}, "timesteps"), ({"coding": "morse"}, "coding"),
                                        ({"threshold": "median"}, "threshold"), ({"headroom": 0}, "headroom"),
                                        ({"outliers": ["bogus"]}, "outliers"), ({"name": "gpt"}, "recipe")])
def test_recipe_values_out_of_their_valid_set_are_refused_by_name(edit, named, exported, tmp_path):
    import shutil

    copy = shutil.copytree(exported, tmp_path / "edited")
    _edit_config(copy, rehash=True, **edit)  # consistent hash: only the value check can refuse it
    with pytest.raises(CheckpointError, match=named):
        ann2snn.load(copy)


def test_an_intact_export_loads_and_keeps_no_hash_in_its_metadata(exported):
    assert "config_sha256" not in ann2snn.load(exported).ann2snn


# --- too little calibration text, windows longer than the model (17.4) ---------------------------------

def test_one_sentence_of_calibration_text_is_refused(qwen2_checkpoint, tmp_path):
    sentence = tmp_path / "one.txt"
    sentence.write_text("It is a truth universally acknowledged.\n")
    line = one_error_line(run("convert", qwen2_checkpoint, "--out", tmp_path / "snn", "--calib-data", sentence))
    assert f"fewer than the {MIN_TOKENS}" in line and "--calib-data" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]  # no export, no resume file


def test_fewer_windows_than_asked_warn_with_the_numbers(qwen2_checkpoint, tmp_path):
    tokenizer = ann2snn.load_tokenizer(qwen2_checkpoint)
    ids = tokenizer(Path(UNSEEN).read_text()[:40000], add_special_tokens=False)["input_ids"][:1500]
    short = tmp_path / "short.txt"
    short.write_text(tokenizer.decode(ids))
    result = run("convert", qwen2_checkpoint, "--out", tmp_path / "snn", "--calib-data", short, "--calib-samples", 16,
                 "--seq-len", 128)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "16 of 128 (2048 tokens) asked" in warning[0], result.output
    windows, tokens = map(int, re.search(r"gives (\d+) window\(s\) of 128 tokens \((\d+) tokens\)", warning[0]).groups())
    assert windows * 128 == tokens and MIN_TOKENS <= tokens < 2048
    with warnings.catch_warnings(record=True) as caught:  # the Python API warns the same way
        warnings.simplefilter("always")
        ann2snn.convert(*ann2snn.load_ann(str(qwen2_checkpoint)), calib_data=short, calib_samples=16, seq_len=128,
                        progress=False)
    assert [w.category for w in caught if issubclass(w.category, TooLittleTextWarning)] == [TooLittleTextWarning]


def test_windows_beyond_the_model_positions_are_refused_before_loading(qwen2_checkpoint, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --seq-len was checked")

    monkeypatch.setattr(ann2snn, "load_ann", no_loading)
    line = one_error_line(run("convert", qwen2_checkpoint, "--out", tmp_path / "snn", "--seq-len", 300))
    assert "--seq-len 300 is beyond the model's 256 positions" in line


def test_fine_tuning_on_one_sentence_is_refused(exported, tmp_path):
    sentence = tmp_path / "one.txt"
    sentence.write_text("It is a truth universally acknowledged.\n")
    line = one_error_line(run("finetune", exported, "--data", sentence, "--out", tmp_path / "tuned", "--steps", 1))
    assert "fine-tuning data gives" in line and f"fewer than the {MIN_TOKENS}" in line
    assert not (tmp_path / "tuned").exists()


# --- one line, not a traceback; --help without torch (17.5) --------------------------------------------

def test_an_empty_prompt_is_one_line(exported):
    assert "--prompt is empty" in one_error_line(run("generate", exported, "--prompt", ""))


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["convert", "--help"], ["finetune", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    probe = ("import sys\nfrom ann2snn.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
             "print('heavy:', sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))") % args
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"


def test_the_cli_lists_the_fine_tuning_rules_there_are():
    from ann2snn.cli_support import FINETUNE_RULES
    from ann2snn.finetune.core import RULES

    assert FINETUNE_RULES == RULES  # written out in the CLI so that --help does not import torch


# Runs the CLI with `import torch` made slow and announced, so a Ctrl-C lands in the start-up imports.
SLOW_TORCH = """
import sys, time
class SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("IMPORTING TORCH", file=sys.stderr, flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, SlowTorch())
from ann2snn.cli import main
main()
"""


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = start_child([sys.executable, "-c", SLOW_TORCH, "convert", "qwen2-tiny", "--out", str(tmp_path / "snn")],
                       dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    seen = wait_for_marker(proc, "IMPORTING TORCH")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert seen, "the start-up never reached `import torch`"
    assert proc.returncode == 130 and rest.strip() == "interrupted: nothing was written", rest
    assert not (tmp_path / "snn").exists()


# --- smaller promises (17.6) ---------------------------------------------------------------------------

def test_outliers_auto_prints_its_decision(qwen2_checkpoint, tmp_path):
    result = run("convert", qwen2_checkpoint, "--out", tmp_path / "snn", *SMALL_CALIBRATION, "--outliers", "auto")
    assert result.exit_code == 0, result.output
    decided = ",".join(json.loads((tmp_path / "snn" / "snn_config.json").read_text())["recipe"]["outliers"]) or "none"
    assert re.search(rf"outliers: auto → {decided} \(sink (on|off: [^,]+), first-token ratio [\d.]+\)", result.output)


def test_eval_of_missing_data_does_not_call_it_calibration_data(exported, tmp_path):
    line = one_error_line(run("eval", exported, "--data", tmp_path / "missing.txt"))
    assert "evaluation data" in line and "calibration" not in line


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_all_get_the_mode_open_gives_under_the_umask(exported, tmp_path, umask):
    model = ann2snn.load(exported)
    previous = os.umask(umask)
    try:
        out = ann2snn.save(model, tmp_path / "snn", ann2snn.load_tokenizer(exported))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would write 0600


def test_finetune_resumes_by_itself_like_convert(exported, tmp_path, monkeypatch):
    import ann2snn.pipeline as pipeline

    data = tmp_path / "text.txt"
    data.write_text(Path(UNSEEN).read_text()[:20000])
    out = tmp_path / "tuned"
    settings = dict(rule="distill", steps=2, seq_len=32, batch_size=2, force=True)  # force: train even within noise

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # the fine-tune finishes, then Ctrl-C before its export
        patch.setattr(pipeline, "save", interrupted)
        with pytest.raises(Interrupted) as caught:
            ann2snn.finetune_export(exported, data, out, progress=False, **settings)
    checkpoints = tmp_path / ".tuned.finetune"
    assert caught.value.kept == [checkpoints] and (checkpoints / "finetune-checkpoint.pt").is_file()

    result = run("finetune", exported, "--data", data, "--out", out, "--steps", 2, "--seq-len", 32, "--batch-size", 2,
                 "--force", "--json")  # no --resume
    assert result.exit_code == 0, result.output
    assert f"resuming the fine-tune from the checkpoint in {checkpoints}" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["resumed_from_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tuned"]


def test_interrupted_convert_says_where_its_resume_files_are(qwen2_checkpoint, tmp_path, monkeypatch):
    import ann2snn.export as export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_weights", interrupted)
    result = run("convert", qwen2_checkpoint, "--out", tmp_path / "snn", *SMALL_CALIBRATION)
    assert result.exit_code == 130
    resume = tmp_path / ".snn.calibration.safetensors"
    assert resume.is_file() and result.output.strip().splitlines()[-1] == (
        f"interrupted: no export was written; {resume} kept to resume from: rerun the same command to continue "
        "(or delete them)")


def test_embedded_tokenizer_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = ann2snn.load_tokenizer("qwen2-tiny")
    assert tokenizer.decode(tokenizer("It was a truth")["input_ids"]) == "It was a truth"


def test_layer_by_layer_takes_what_the_cli_takes(tmp_path):
    from ann2snn.layerwise import convert_layer_by_layer

    meta = convert_layer_by_layer("qwen2-tiny", tmp_path / "snn", timesteps=8, dtype="float32", calib_samples=8,
                                  progress=False)
    assert meta["recipe"]["timesteps"] == 8 and ann2snn.load(tmp_path / "snn").ann2snn["recipe"]["timesteps"] == 8


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "It was" in printed
