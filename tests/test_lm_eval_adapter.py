"""The lm-eval adapter: an ann2snn export as lm-eval model "ann2snn", on hand-made requests and a local task."""

import json

import pytest
import torch
from click.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval comes with the test extra: pip install -e '.[test]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.calibration.data import bundled_text  # noqa: E402
from ann2snn.cli import main  # noqa: E402
from ann2snn.errors import ConfigError  # noqa: E402
from ann2snn.lm_eval_adapter import Ann2SnnLM  # noqa: E402  (registers "ann2snn")


@pytest.fixture(scope="module")
def exported(qwen2_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "snn"
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(out), "--calib-data",
                                       str(bundled_text("unseen.txt")), "--calib-samples", "4", "--seq-len", "32",
                                       "--timesteps", "4", "--threshold", "max", "--seed", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lm(exported):
    return get_model("ann2snn").create_from_arg_string(f"path={exported},device=cpu,batch_size=2")


def _by_hand(exported, context, continuation, simulation="fast"):
    """log P(continuation | context) and whether it is the greedy continuation, from the model's own logits."""
    model, tokenizer = ann2snn.load(exported), ann2snn.load_tokenizer(exported)
    ann2snn.set_simulation(model, simulation)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole]), use_cache=False).logits.float().log_softmax(-1)[0]
    targets = torch.tensor(whole[start:])
    scores = logits[start - 1:len(whole) - 1]
    return scores.gather(-1, targets[:, None]).sum().item(), bool((scores.argmax(-1) == targets).all())


def test_registered_under_ann2snn(lm):
    assert get_model("ann2snn") is Ann2SnnLM and isinstance(lm, Ann2SnnLM)
    assert lm.get_model_info()["timesteps"] == 4


def test_loglikelihood_matches_the_model(lm, exported):
    pairs = [("The cat sat on", " the mat"), ("It was", " a"), ("Once upon a time there", " was a king")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (logprob, greedy), pair in zip(results, pairs):
        expected, expected_greedy = _by_hand(exported, *pair)
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_step_simulation_gives_the_same_scores(exported):
    step = Ann2SnnLM(path=str(exported), simulation="step", device="cpu")
    (logprob, _), = step.loglikelihood([Instance("loglikelihood", {}, ("The cat sat on", " the mat"), 0)])
    # against the model run step by step by hand: fast and step differ in float32 where an input sits within one
    # rounding of a level boundary (0.02 here, through the spiking head's 31 levels; exact in float64, test_convert)
    assert logprob == pytest.approx(_by_hand(exported, "The cat sat on", " the mat", "step")[0], abs=1e-3)


def test_generate_until_continues_the_prompt(lm, exported):
    out, = lm.generate_until([Instance("generate_until", {}, ("It was", {"until": ["\n\n"], "max_gen_toks": 4,
                                                                         "do_sample": False}), 0)])
    model, tokenizer = ann2snn.load(exported), ann2snn.load_tokenizer(exported)
    ids = tokenizer("It was", return_tensors="pt")["input_ids"]
    greedy = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert isinstance(out, str) and out == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)


def test_bad_arguments_are_refused(exported):
    with pytest.raises(ConfigError, match="path="):
        Ann2SnnLM()
    with pytest.raises(ConfigError, match="simulation"):
        Ann2SnnLM(path=str(exported), simulation="slow")


def test_simple_evaluate_runs_a_local_task(exported, tmp_path, monkeypatch):
    """`lm_eval --model ann2snn --model_args path=DIR` through lm-eval's API, on a task from a local file."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in [
        {"question": "The cat sat on the", "choices": [" mat", " sky"], "answer": 0},
        {"question": "It was a dark and stormy", "choices": [" night", " spoon"], "answer": 0},
        {"question": "One, two,", "choices": [" three", " blue"], "answer": 0},
    ]))
    (tmp_path / "tiny.yaml").write_text(
        "task: ann2snn_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {docs}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="ann2snn", model_args=f"path={exported},device=cpu", tasks=["ann2snn_tiny"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      batch_size=2)
    accuracy = results["results"]["ann2snn_tiny"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and results["results"]["ann2snn_tiny"]["sample_len"] == 3
    assert results["config"]["model_name"] == f"ann2snn:{exported}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_request_falls_back_to_the_cpu():
    # lm-eval's command line passes --device cuda:0 unless told otherwise.
    from ann2snn.lm_eval_adapter import _pick_device

    assert _pick_device("cuda:0") == "cpu" and _pick_device(None) == "cpu" and _pick_device("cpu") == "cpu"
