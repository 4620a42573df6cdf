"""`ann2snn report`: spike and operation counts checked by hand, the energy formula, and the files the CLI writes."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from spikingjelly.activation_based.op_counter import ModuleCounterMode
from torch import nn

import ann2snn
from ann2snn.calibration.data import bundled_text, read_texts, token_windows
from ann2snn.cli import main
from ann2snn.coding import SpikeCode
from ann2snn.errors import ConfigError
from ann2snn.modules.attention import SNNMatmul
from ann2snn.modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from ann2snn.modules.synapsis import Synapsis
from ann2snn.rebuild import rebuild_at
from ann2snn.report import (SNN_FIELDS, CountCache, EnergyModel, SpikeFieldCounter, build_report, energy_estimate,
                            matmul_counts, render_markdown)

UNSEEN = str(bundled_text("unseen.txt"))
HELDOUT = str(bundled_text("heldout.txt"))


def counted(module, *inputs):
    """Run `module` in step simulation under the report's counters; {field: Global total}."""
    cache = CountCache()
    counters = {field: SpikeFieldCounter(field, cache) for field in SNN_FIELDS}
    set_simulation(module, "step")
    with torch.no_grad(), ModuleCounterMode(list(counters.values()), model=module):
        out = module(*inputs)
    return out, {field: counter.get_total() for field, counter in counters.items()}


def test_synapsis_phase_code_counts_by_hand():
    # Phase code, T=3: weights 4, 2, 1; Δ = 1. The neuron fires (reset by subtraction, firing thresholds ±3, ±1.5, ±0.5):
    #   x =  5: +1 (v 5→1), 0, +1 (1→0)             → 4 + 1 = 5, 2 spikes
    #   x =  0: nothing
    #   x = −3: 0 (−3 is not below −3), −1 (−3→−1), −1 (−1→0) → −2 − 1 = −3, 2 spikes
    # Per step: 1, 1, 2 spikes. out_features = 2: ACs = 4·2 = 8. Shifts: the row's two output accumulators
    # each shift once in each weighted step with any spike (t=0 and t=1 weigh 4 and 2; t=2 weighs 1): 2·2 = 4.
    linear = nn.Linear(3, 2)
    synapsis = Synapsis(linear, SpikeCode("phase", 3), delta=torch.ones(3))
    x = torch.tensor([[5.0, 0.0, -3.0]])
    out, counts = counted(synapsis, x)
    assert torch.allclose(out, linear(x), atol=1e-5)  # exact on this grid
    assert counts["spikes"] == 4 and counts["weighted_spikes"] == 2 and counts["positive_spikes"] == 2
    assert counts["ac"] == 8 and counts["shifts"] == 4
    assert counts["bias_adds"] == 2  # one row, two outputs
    assert counts["neuron_inputs"] == 3 and counts["neuron_updates"] == 9 and counts["encodings"] == 3


def test_synapsis_rate_code_needs_no_shift():
    # Rate code, T=4, Δ = 1: x = 2 → two +1 spikes, x = −1 → one −1 spike, x = 0 → none; 3 spikes × 5 outputs.
    synapsis = Synapsis(nn.Linear(3, 5, bias=False), SpikeCode("rate", 4), delta=torch.ones(3))
    _, counts = counted(synapsis, torch.tensor([[2.0, -1.0, 0.0]]))
    assert counts["spikes"] == 3 and counts["ac"] == 15 and counts["shifts"] == 0 and counts["bias_adds"] == 0
    assert counts["neuron_updates"] == 12


def _train(spikes, weights):
    spikes = torch.tensor(spikes, dtype=torch.float32)
    return SpikeTrain(spikes, torch.tensor(weights, dtype=torch.float32), torch.ones(spikes.shape[-1]))


A_SPIKES = [[[1, 0], [0, 0]],            # t=0: one spike
            [[0, -1], [1, 0]]]           # t=1: two spikes        a: [T=2, M=2, K=2]
B_SPIKES = [[[1, 0, 0], [0, 0, 0]],      # t=0: one spike
            [[0, 0, 0], [0, 1, 1]]]      # t=1: two spikes        b: [T=2, K=2, N=3]


def test_snn_matmul_rate_counts_by_hand():
    # b's spikes meet a column of A_≤t: 3 spikes × M=2 = 6; a's spikes meet a row of B_<t, none at t=0:
    # 2 spikes × N=3 = 6; every spike enters its running sum once: 3 + 3. Total 18, no shifts.
    a, b = _train(A_SPIKES, [1, 1]), _train(B_SPIKES, [1, 1])
    out, counts = counted(SNNMatmul(), a, b)
    assert torch.allclose(out, a.accumulate() @ b.accumulate())
    assert counts["ac"] == 18 and counts["shifts"] == 0
    assert matmul_counts(a, b) == {"ac": 18, "shifts": 0, "causal_mac": 2 * 3 * 2}  # no mask: the M·N·K product


def test_snn_matmul_phase_shifts_by_hand():
    # Phase T=2: w = (2, 1); only t=0 is weighted. There b's one spike (column n=0) reaches the M=2 accumulators
    # of column 0: 2 shifts; a's t=0 spike meets the empty B_<0 (nothing); a spike entering its running sum adds
    # the constant ±w_t·Δ, no shift. Shifts = 2.
    a, b = _train(A_SPIKES, [2, 1]), _train(B_SPIKES, [2, 1])
    assert matmul_counts(a, b)["ac"] == 18 and matmul_counts(a, b)["shifts"] == 2


def test_snn_matmul_counts_broadcast_batches():
    # b shared by 3 batch entries of a: each b spike meets 3 copies of A.
    a = _train([[[[1, 0], [0, 0]]] * 3, [[[0, 0], [0, 0]]] * 3], [1, 1])  # [T=2, 3, M=2, K=2]: 3 spikes at t=0
    b = _train(B_SPIKES, [1, 1])
    assert matmul_counts(a, b)["ac"] == 3 * 2 * 3 + 0 + 3 + 3


def test_neuron_firing_rate_by_hand():
    neuron = SignedNeuron(SpikeCode("rate", 4), 2, torch.ones(2))
    _, counts = counted(neuron, torch.tensor([[3.0, 0.0], [-1.0, 1.0]]))
    assert counts["spikes"] == 5 and counts["neuron_updates"] == 16  # 3 + 0 + 1 + 1 spikes over 4 inputs × 4 steps


def test_energy_formula():
    totals = {"ann_mac": 1000, "snn_ac": 2000, "snn_shifts": 500, "bias_adds": 10, "float_mac": 100,
              "float_flops": 50, "snn_encoding_flops": 20, "neuron_updates": 300}
    e = energy_estimate(totals, EnergyModel(), tokens=10)
    assert e["convention"]["name"] == "45nm-horowitz2014-fp32" and "E_MAC = 4.6 pJ" in e["convention"]["text"]
    float_common = 100 * 4.6 + 50 * 4.6
    assert e["ann_pj"] == pytest.approx(1000 * 4.6 + 10 * 0.9 + float_common)
    # neuron updates are charged: a compare and a subtract, 2·E_AC each
    assert e["snn_pj"] == pytest.approx(2000 * 0.9 + 500 * 0.9 + 300 * 2 * 0.9 + 20 * 4.6 + 10 * 0.9 + float_common)
    assert e["snn_pj_per_token"] == pytest.approx(e["snn_pj"] / 10)
    assert e["spiking_layers_only"]["snn_pj"] == pytest.approx(2500 * 0.9 + 300 * 2 * 0.9)
    custom = energy_estimate(totals, EnergyModel(e_mac_pj=3.0, e_ac_pj=0.1, e_shift_pj=0.05, e_float_pj=1.0,
                                                 e_neuron_pj=0.01), tokens=10)
    assert custom["convention"]["name"] == "custom"
    assert custom["snn_pj"] == pytest.approx(2000 * 0.1 + 500 * 0.05 + 300 * 0.01 + 20 * 1.0 + 10 * 0.1 + 100 * 3.0 + 50 * 1.0)
    with pytest.raises(ConfigError):
        EnergyModel(e_ac_pj=-1.0)
    with pytest.raises(ConfigError):
        EnergyModel(e_mac_pj=float("nan"))


@pytest.fixture(scope="module")
def exported(qwen2_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "snn"
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(out), "--calib-data", UNSEEN,
                                       "--calib-samples", "4", "--seq-len", "32", "--timesteps", "4", "--threshold", "max",
                                       "--seed", "1", "--levels", "auto"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def small_report(exported):
    model = ann2snn.load(exported)
    windows = token_windows(ann2snn.load_tokenizer(exported), read_texts(HELDOUT), 16, max_tokens=64)
    return model, windows, build_report(model, windows, batch_size=2, progress=False)


def test_report_counts_are_consistent_with_shapes_and_spikes(small_report):
    model, windows, report = small_report
    config = model.config
    n, s = windows.shape
    tokens = n * s
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    modules = report["modules"]
    q = modules["model.layers.0.self_attn.q_proj"]
    assert q["ann_mac"] == tokens * hidden * heads * head_dim  # spikingjelly's MACCounter on the ANN pass
    assert q["ac"] == modules[q["input_neuron"]]["spikes"] * q["out_features"]
    causal = n * heads * s * (s + 1) // 2  # scores on or below the diagonal
    assert modules["model.layers.0.self_attn.snn.qk"]["ann_mac"] == causal * head_dim
    assert modules["model.layers.0.self_attn.snn.pv"]["ann_mac"] == causal * head_dim
    assert modules["model.layers.0.self_attn.snn.qk"]["ann_mac_executed"] == n * heads * s * s * head_dim
    assert modules["model.layers.0.self_attn.snn.softmax.neuron"]["neuron_inputs"] == causal
    assert modules["lm_head"]["ann_mac"] == tokens * hidden * config.vocab_size  # the spiking head (default)
    assert "lm_head" not in report["float_operations"]["mac"]
    for name, m in modules.items():
        if m["kind"] == "neuron":
            # each neuron over its own window: its site's T (per-site levels) and range steps
            assert m["neuron_updates"] == m["neuron_inputs"] * m["timesteps"] and 0 <= m["firing_rate"] <= 1
    layer0 = report["layers"][0]
    in_layer0 = [m for m in modules.values() if m["layer"] == 0]
    assert layer0["ac"] == sum(m.get("ac", 0) for m in in_layer0)
    assert layer0["spikes"] == sum(m.get("spikes", 0) for m in in_layer0)
    assert layer0["ann_mac"] == sum(m.get("ann_mac", 0) for m in in_layer0)
    totals = report["totals"]
    assert totals["snn_ac"] == sum(r["ac"] for r in report["layers"]) + modules["lm_head"]["ac"]  # the head is no layer
    assert totals["snn_shifts"] > 0  # phase code: weighted spikes
    assert all(r["cosine_similarity"] > 0.9 for r in report["layers"])
    assert report["tokens_scored"] == n * (s - 1) and 0 <= report["top1_agreement"] <= 1


def test_report_perplexities_match_evaluate(small_report):
    from ann2snn.evaluate import compare

    model, windows, report = small_report
    reference = compare(model, windows, "fast")
    assert report["ppl_ann"] == pytest.approx(reference["ppl_ann"], rel=1e-4)
    # the report steps through time in float32; a handful of near-tie roundings may differ from "fast"
    assert report["ppl_snn"] == pytest.approx(reference["ppl_snn"], rel=5e-3)


def test_markdown_names_the_convention(small_report):
    text = render_markdown(small_report[2])
    assert "45nm-horowitz2014-fp32" in text and "E_AC = 0.9 pJ" in text and "## Per layer" in text
    assert "shifts" in text and "lm_head" in text


def test_rebuild_at_own_timesteps_reproduces_the_export(exported):
    loaded = ann2snn.load(exported).state_dict()
    rebuilt = rebuild_at(exported, 4)
    state = rebuilt.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(state[k], loaded[k]) for k in loaded)
    other = rebuild_at(exported, 6)
    assert other.ann2snn["recipe"]["timesteps"] == 6
    # per-site levels allocated again at T=6, under the export's own budget
    recipe, allocation = other.ann2snn["recipe"], other.ann2snn["allocation"]
    assert recipe["level_allocation"] == "auto" and allocation["measured_ppl_ratio"] <= recipe["max_ppl_ratio"]
    site = "model.layers.0.self_attn.q_proj"
    assert other.model.layers[0].self_attn.q_proj.neuron.code.timesteps == other.ann2snn["site_timesteps"].get(site, 6)


def test_rebuild_at_another_t_follows_the_level_table_unless_the_export_chose(qwen2_checkpoint, tmp_path):
    """Defaults at T=4 (mse ×1) become the table's defaults at T=9 (max ×2); a chosen headroom stays."""
    for name, extra in (("defaults", []), ("chosen", ["--headroom", "3"])):
        result = run("convert", qwen2_checkpoint, "--out", tmp_path / name, "--calib-samples", 4, "--seq-len", 32,
                     "--timesteps", 4, *extra)
        assert result.exit_code == 0, result.output
    table = rebuild_at(tmp_path / "defaults", 9).ann2snn["recipe"]
    assert (table["threshold"], table["headroom"]) == ("max", 2.0)
    kept = rebuild_at(tmp_path / "chosen", 9).ann2snn["recipe"]
    assert (kept["threshold"], kept["headroom"]) == ("mse", 3.0)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_json_markdown_and_plots(exported, tmp_path):
    out = tmp_path / "rep"
    result = run("report", exported, "--data", HELDOUT, "--out", out, "--timesteps", "3,4", "--max-tokens", 64,
                 "--seq-len", 16, "--e-ac", 0.5)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert [r["timesteps"] for r in data["runs"]] == [3, 4] and data["primary_timesteps"] == 4
    assert data["energy_convention"]["e_ac_pj"] == 0.5 and data["tokens_processed"] == 64
    assert all(math.isfinite(r["ppl_snn"]) for r in data["runs"])
    text = (out / "report.md").read_text()
    assert "| T | levels |" in text and "## Per spiking module" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots" in text
    else:
        for png in ("firing_rate.png", "cosine_similarity.png", "perplexity_vs_T.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["out_exists", "bad_timesteps", "negative_timesteps", "missing_export", "missing_data",
                                  "bundled_name"])
def test_cli_errors_are_one_line_and_write_nothing(case, exported, tmp_path, monkeypatch):
    out, args = tmp_path / "rep", []
    export, data = exported, HELDOUT
    if case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad_timesteps":
        args = ["--timesteps", "4,zero"]
    elif case == "negative_timesteps":
        args = ["--timesteps", "4,-2"]
    elif case == "missing_export":
        export = tmp_path / "nope"
    elif case == "bundled_name":  # a bundled text's name, where no such file is: the message says where it is
        monkeypatch.chdir(tmp_path)
        data = "heldout.txt"
    else:
        data = tmp_path / "nope.txt"
    result = CliRunner().invoke(main, ["report", str(export), "--data", str(data), "--out", str(out)] + args)
    assert result.exit_code == 2, result.output
    if case.endswith("timesteps"):
        assert "Invalid value for '--timesteps'" in result.output
    else:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if case == "bundled_name":
        assert "report data heldout.txt does not exist" in result.output
        assert f"the bundled text of that name is {HELDOUT}" in result.output
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_snn_matmul_counts_grouped_query_heads_as_run():
    """a with 2 heads per head of b: b's spikes meet both heads' rows; b's running sum is kept once, not per copy;
    the output accumulators, and so the shifts, are the same either way."""
    torch.manual_seed(0)
    a = _train(torch.randint(-1, 2, (2, 1, 4, 3, 2)).tolist(), [2, 1])  # [T, B, H=4, M=3, K=2]
    b = _train(torch.randint(-1, 2, (2, 1, 2, 2, 5)).tolist(), [2, 1])  # [T, B, KVH=2, K=2, N=5]
    repeated = _train(b.spikes.repeat_interleave(2, dim=2).tolist(), [2, 1])
    grouped, copied = matmul_counts(a, b), matmul_counts(a, repeated)
    b_spikes = int(b.spikes.abs().sum())
    assert grouped["ac"] == copied["ac"] - b_spikes  # the copy's second running sum is gone
    assert grouped["shifts"] == copied["shifts"] > 0
