"""The spiking head's window: lm_head's input neuron fires more steps than T where its measured effect asks for them;
the export records it, the step simulation equals the fast one there, and the report counts the head at its own T."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import Qwen2ForCausalLM

import ann2snn
from ann2snn.calibration import levels
from ann2snn.calibration.calibrate import WINDOWS
from ann2snn.calibration.head import MAX_EXTRA_STEPS, TOLERANCE, fit_head
from ann2snn.cli import main
from ann2snn.convert import calibrate
from ann2snn.errors import CheckpointError, ConfigError
from ann2snn.export import config_digest
from ann2snn.modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from ann2snn.recipes import get_recipe
from ann2snn.replace import swap_modules
from ann2snn.report import build_report

T = 2  # 7 levels: the small model's head (logits scaled ×4 below) needs more, as SmolLM2-135M's does at T ≤ 6


@pytest.fixture(scope="module")
def sharp_checkpoint(qwen2_checkpoint, tmp_path_factory):
    """The small checkpoint with its (tied) embedding ×4: logits about as spread as a trained model's, so the head's
    rounding at few levels moves the next-token distribution (at ×1 the random head's softmax is nearly flat)."""
    folder = tmp_path_factory.mktemp("ckpt") / "qwen2-sharp"
    model = Qwen2ForCausalLM.from_pretrained(qwen2_checkpoint)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    model.save_pretrained(folder)
    for tokenizer_file in qwen2_checkpoint.glob("*token*"):
        shutil.copy(tokenizer_file, folder)
    return folder


@pytest.fixture(scope="module")
def calibrated(sharp_checkpoint):
    model, tokenizer = ann2snn.load_ann(str(sharp_checkpoint))
    statistics, info = calibrate(model, tokenizer, calib_samples=8, seq_len=32, progress=False)
    return sharp_checkpoint, statistics, info


def converted(calibrated, **options):
    """Converted at T; with uniform levels unless a level option is given (per-site levels may lower the head)."""
    if not {"levels", "max_ppl_ratio", "energy_budget"} & options.keys():
        options["levels"] = "uniform"
    folder, statistics, info = calibrated
    model, _ = ann2snn.load_ann(str(folder))
    return ann2snn.convert(model, timesteps=T, statistics=statistics, calibration_info=info, progress=False, **options)


@pytest.fixture(scope="module")
def default(calibrated):
    return converted(calibrated)  # no head option: the recipe's rule


def rounded(x: torch.Tensor, delta: torch.Tensor, largest: int) -> torch.Tensor:
    """x on the grid k·Δ, round half up, clamped to ±largest (written here, not ann2snn's SpikeCode)."""
    return torch.clamp(torch.floor(x / delta + 0.5), -largest, largest) * delta


def head_divergence(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, timesteps: int) -> float:
    """exp(mean KL(float head ‖ head on x rounded at `timesteps` phase steps)) − 1, in float64."""
    x, weight, delta = x.double(), weight.detach().double(), delta.double()
    reference = torch.log_softmax(F.linear(x, weight), -1)
    quantised = torch.log_softmax(F.linear(rounded(x, delta, 2**timesteps - 1), weight), -1)
    return float(torch.expm1((reference.exp() * (reference - quantised)).sum(-1).mean()))


def float_head_inputs(model, windows: torch.Tensor) -> torch.Tensor:
    """The final norm's output of the float network (spiking off) over `windows`, [tokens, hidden]."""
    set_simulation(model, "ann")
    try:
        with torch.no_grad():
            return model.model(input_ids=windows).last_hidden_state.flatten(0, 1)
    finally:
        set_simulation(model, "fast")


def test_the_head_gets_the_fewest_steps_whose_own_divergence_is_within_the_tolerance(calibrated, default):
    """The rule, recomputed independently: each candidate window's Δ is the one the converted head would get there
    (read off conversions with fixed head steps), the divergence is measured here."""
    windows = calibrated[2][WINDOWS][:8]
    x = float_head_inputs(default, windows)
    measured = {}
    for extra in range(MAX_EXTRA_STEPS + 1):
        fixed = converted(calibrated, head_steps=extra)
        assert fixed.lm_head.neuron.code.timesteps == T + extra
        measured[T + extra] = head_divergence(x, fixed.lm_head.weight, fixed.lm_head.neuron.delta, T + extra)
    wanted = min(t for t, d in measured.items() if d <= TOLERANCE)
    head = default.lm_head.neuron.code.timesteps
    assert head == wanted > T  # fails if the rule is removed: the head would fire T steps
    assert measured[head - 1] > TOLERANCE >= measured[head]
    found = default.ann2snn["head"]["lm_head"]
    assert found["rule"] == "auto" and found["timesteps"] == head
    assert {int(t): d for t, d in found["divergence"].items()} == pytest.approx(
        {t: d for t, d in measured.items() if t <= head}, rel=1e-2, abs=1e-6)
    # every other site stays at T, and the head's Δ is its own at its T (the level table's rule at its levels)
    others = {m.code.timesteps for name, m in default.named_modules() if isinstance(m, SignedNeuron) and name != "lm_head.neuron"}
    assert others == {T}
    assert torch.equal(default.lm_head.neuron.delta, converted(calibrated, head_steps=head - T).lm_head.neuron.delta)


def test_the_head_at_its_own_t_is_closer_to_the_float_head_on_other_text(calibrated, default):
    at_t = converted(calibrated, head_steps=0)
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))
    x = float_head_inputs(default, windows)
    own = head_divergence(x, default.lm_head.weight, default.lm_head.neuron.delta, default.lm_head.neuron.code.timesteps)
    assert own < head_divergence(x, at_t.lm_head.weight, at_t.lm_head.neuron.delta, T) / 2


def test_the_export_records_the_heads_window_and_old_exports_load_with_the_head_at_t(calibrated, default, tmp_path):
    _, tokenizer = ann2snn.load_ann(str(calibrated[0]))
    head = default.lm_head.neuron.code.timesteps
    ids = tokenizer("It was the best of times, it was the worst of times.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = default(ids).logits
    out = ann2snn.save(default, tmp_path / "snn", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    assert config["format_version"] == 6 and config["site_timesteps"] == {"lm_head": head}
    assert config["recipe"]["head_steps"] == "auto" and config["head"]["lm_head"]["timesteps"] == head
    loaded = ann2snn.load(out)
    assert loaded.lm_head.neuron.code.timesteps == head and loaded.model.layers[0].mlp.act_fn.neuron.code.timesteps == T
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    # rebuilt from the export's statistics (convert --calib-stats), the head is measured again to the same window
    model, _ = ann2snn.load_ann(str(calibrated[0]))
    again = ann2snn.convert(model, timesteps=T, calib_stats=out / "calibration.safetensors", levels="uniform",
                            progress=False)
    assert again.ann2snn["site_timesteps"] == {"lm_head": head}
    # more steps than the head may have, or more than T at any other site, is refused by name
    for site, t in (("lm_head", T + MAX_EXTRA_STEPS + 1), ("model.layers.0.mlp.act_fn", T + 1)):
        edited = dict(config, site_timesteps={site: t})
        edited["config_sha256"] = config_digest(edited)
        (out / "snn_config.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match="site_timesteps"):
            ann2snn.load(out)
    # an export from before the head's window (format 5: no head_steps, no head entry): its head fires T
    old = converted(calibrated, head_steps=0)
    with torch.no_grad():
        old_logits = old(ids).logits
    out = ann2snn.save(old, tmp_path / "old", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    del config["recipe"]["head_steps"], config["head"]
    config["format_version"] = 5
    config["config_sha256"] = config_digest(config)
    (out / "snn_config.json").write_text(json.dumps(config))
    loaded = ann2snn.load(out)
    assert loaded.lm_head.neuron.code.timesteps == T
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, old_logits)


def test_step_simulation_equals_fast_with_the_head_above_t(default):
    """The head's neuron fires its own window; its train sums to the fast path's value; end to end in float64 the
    step simulation's logits are the fast simulation's."""
    head = default.lm_head.neuron.code.timesteps
    assert head > T
    seen = {}

    def neuron_hook(module, args, out):
        assert isinstance(out, SpikeTrain) and out.timesteps == head
        assert torch.equal(out.accumulate(), module.code.quantise(args[0], module.delta))
        seen["trains"] = seen.get("trains", 0) + 1

    model = default.double()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    handle = model.lm_head.neuron.register_forward_hook(neuron_hook)
    try:
        with torch.no_grad():
            set_simulation(model, "step")
            stepped = model(ids).logits
            handle.remove()
            set_simulation(model, "fast")
            fast = model(ids).logits
    finally:
        handle.remove()
        set_simulation(model, "fast")
        model.float()
    assert seen["trains"] == 1
    torch.testing.assert_close(stepped, fast, rtol=0, atol=1e-9)


def test_the_report_counts_the_head_at_its_own_t(calibrated, default):
    head = default.lm_head.neuron.code.timesteps
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    report = build_report(default, windows, progress=False)
    at_t = build_report(converted(calibrated, head_steps=0), windows, progress=False)
    row, row_at_t = report["modules"]["lm_head.neuron"], at_t["modules"]["lm_head.neuron"]
    assert row["timesteps"] == head and row_at_t["timesteps"] == T
    assert row["neuron_updates"] == row["neuron_inputs"] * head and row_at_t["neuron_updates"] == row["neuron_inputs"] * T
    # everything but the head counts alike; the head's extra steps add its updates, spikes, ACs and shifts
    extra = row["neuron_inputs"] * (head - T)
    assert report["totals"]["neuron_updates"] == at_t["totals"]["neuron_updates"] + extra
    synapsis, synapsis_at_t = report["modules"]["lm_head"], at_t["modules"]["lm_head"]
    assert synapsis["ac"] == row["spikes"] * synapsis["out_features"] and synapsis["ac"] > synapsis_at_t["ac"]
    assert synapsis["shifts"] > synapsis_at_t["shifts"]
    weights = default.lm_head.weight.numel()
    assert report["totals"]["spiking_weight_steps"] - at_t["totals"]["spiking_weight_steps"] == weights * (head - T)
    assert report["energy"]["snn_pj"] > at_t["energy"]["snn_pj"]
    assert report["site_timesteps"] == {"lm_head": head}


def test_per_site_levels_start_the_head_from_its_own_window_and_never_raise_a_site(calibrated, default):
    folder, statistics, info = calibrated
    model, _ = ann2snn.load_ann(str(folder))
    recipe = get_recipe("qwen2").with_options(timesteps=T)
    ctx = swap_modules(model, recipe, statistics)
    fit_head(model, ctx, info[WINDOWS])
    head = default.lm_head.neuron.code.timesteps
    sites = {site.name: site for site in levels._sites(model, ctx)}
    assert sites["lm_head"].top == head and max(t for t, _ in sites["lm_head"].settings) == head
    assert {site.top for name, site in sites.items() if name != "lm_head"} == {T}
    allocated = converted(calibrated, max_ppl_ratio=2.0)
    tops = {name: site.top for name, site in sites.items()}
    assert all(t <= tops[site] for site, t in allocated.ann2snn["site_timesteps"].items())
    assert allocated.lm_head.neuron.code.timesteps <= head


def test_bad_head_steps_are_refused_in_one_line(qwen2_checkpoint, tmp_path):
    out = tmp_path / "snn"
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(out), "--head-steps", "4"])
    assert result.exit_code == 2 and "head steps" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    for bad in ("some", -1, 1.5, True):
        with pytest.raises(ConfigError, match="head steps"):
            get_recipe("qwen2").with_options(head_steps=bad)
