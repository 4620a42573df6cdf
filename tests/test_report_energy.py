"""The three energy views of `ann2snn report`, checked against hand computation, and the report's CLI promises
(--overwrite, a fine-tuned export, the --data file named)."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ann2snn
from ann2snn.calibration.data import bundled_text
from ann2snn.cli import main
from ann2snn.coding import SpikeCode
from ann2snn.errors import ConfigError
from ann2snn.modules.neuron import SpikeTrain
from ann2snn.modules.synapsis import Synapsis
from ann2snn.rebuild import rebuild_at
from ann2snn.report import EnergyModel, IntegerModel, MemoryModel, integer_estimate, matmul_counts, memory_traffic
from ann2snn.report.counting import operand_bits

from test_report import counted, exported  # noqa: F401  (the module-scoped export fixture)

HELDOUT = str(bundled_text("heldout.txt"))


def test_synapsis_shifts_once_per_accumulator_per_weighted_step():
    # Phase T=3 (w = 4, 2, 1), Δ = 1, three outputs.
    # Row 0, x = (0.6, 0.6, 0): each rounds to 1 and fires +1 at t=2 only (weight 1): 2 spikes, no shift.
    # Row 1, x = (4, 4, 4): each fires +1 at t=0 (weight 4) and stops: 3 spikes in one weighted step,
    # so the row's 3 accumulators shift once each: 3 shifts (one per synaptic event would be 9).
    synapsis = Synapsis(nn.Linear(3, 3, bias=False), SpikeCode("phase", 3), delta=torch.ones(3))
    _, counts = counted(synapsis, torch.tensor([[0.6, 0.6, 0.0], [4.0, 4.0, 4.0]]))
    assert counts["spikes"] == 5 and counts["weighted_spikes"] == 3
    assert counts["ac"] == 5 * 3 and counts["shifts"] == 3


def _ones(shape, weights):
    spikes = torch.ones(shape)
    return SpikeTrain(spikes, torch.tensor(weights, dtype=torch.float32), torch.ones(()))


CAUSAL = torch.tril(torch.ones(3, 3, dtype=torch.bool))  # query m sees keys n ≤ m


def test_causal_scores_by_hand():
    # QKᵀ, K = 1, M = N = 3, rate T=2. b (kᵀ) fires once per key at t=0; a (q) fires at both steps.
    # b's spike at key n reaches the visible queries m ≥ n: 3 + 2 + 1 = 6 ACs.
    # a's spikes at t=1 (t=0 meets the empty B_<0) reach the visible keys n ≤ m: 1 + 2 + 3 = 6 ACs.
    # Running sums: 6 spikes of a, 3 of b. Total 21 (27 without the mask: 9 + 9 + 9).
    a = _ones((2, 3, 1), [1, 1])
    b = SpikeTrain(torch.tensor([[[1.0, 1, 1]], [[0, 0, 0]]]), torch.ones(2), torch.ones(()))
    assert matmul_counts(a, b, wanted=CAUSAL) == {"ac": 21, "shifts": 0, "causal_mac": 6}
    assert matmul_counts(a, b)["ac"] == 27 and matmul_counts(a, b)["causal_mac"] == 9
    # Phase T=2 (w = 2, 1): at t=0 b reaches every visible score: 6 accumulators shift once (9 without the mask).
    phase = [2, 1]
    a, b = SpikeTrain(a.spikes, torch.tensor(phase), a.delta), SpikeTrain(b.spikes, torch.tensor(phase), b.delta)
    assert matmul_counts(a, b, wanted=CAUSAL)["shifts"] == 6 and matmul_counts(a, b)["shifts"] == 9


def test_causal_probabilities_by_hand():
    # P·V, M = K = 3 (probabilities, zero above the diagonal), N = 2, rate T=1. v fires everywhere (6 spikes);
    # v's spike at key k reaches the queries that can hold a probability for k, m ≥ k: (3 + 2 + 1) per column,
    # × 2 columns = 12 ACs; running sums: 6 + 6. The dense product: 6 visible probabilities × N = 12 MACs.
    probs = SpikeTrain(CAUSAL.float().unsqueeze(0), torch.ones(1), torch.ones(()))
    v = _ones((1, 3, 2), [1])
    assert matmul_counts(probs, v, a_support=CAUSAL) == {"ac": 24, "shifts": 0, "causal_mac": 12}
    assert matmul_counts(probs, v)["causal_mac"] == 18


@pytest.mark.parametrize("coding, timesteps, bits", [("phase", 8, 9), ("phase", 4, 5), ("rate", 8, 5), ("rate", 1, 2)])
def test_operand_bits_hold_the_levels(coding, timesteps, bits):
    code = SpikeCode(coding, timesteps)  # phase T=8: 511 levels → 9 bits; rate T=8: 17 → 5; rate T=1: 3 → 2
    train = SpikeTrain(torch.zeros(timesteps, 1), code.step_weights(), torch.ones(()))
    assert operand_bits(train) == bits and 2 ** (bits - 1) < code.levels <= 2 ** bits


TOTALS = {"ann_mac": 110, "snn_ac": 200, "snn_shifts": 10, "neuron_updates": 30, "bias_adds": 10, "float_mac": 5,
          "float_flops": 7, "snn_encoding_flops": 3, "neuron_inputs": 6,
          "ann_mac_by_bits": [{"activation_bits": 9, "operand_bits": None, "mac": 100},
                              {"activation_bits": 9, "operand_bits": 5, "mac": 10}],
          "synapsis_mac": 100, "synapsis_ac": 150, "spiking_weights": 40, "float_weights": 8, "passes": 2,
          "timesteps": 5, "spiking_weight_steps": 40 * 5}


def test_integer_view_by_hand():
    # 9-bit × 16-bit weight: 0.2·9·16/64 = 0.45 pJ + a 32-bit add 0.1 = 0.55 pJ; 9 × 5 bits: 0.140625 + 0.1.
    e = integer_estimate(TOTALS, IntegerModel(), EnergyModel(), tokens=4)
    ann_spiking = 100 * 0.55 + 10 * (0.2 * 45 / 64 + 0.1)
    snn_spiking = 200 * 0.1 + 10 * 0.1 + 30 * 2 * 0.1  # AC = add, shift = add, neuron update = 2 adds
    common = 10 * 0.1 + 5 * 4.6 + 7 * 4.6 + 3 * 4.6  # bias adds, float MACs and FLOPs, both models' quantisers
    assert e["spiking_layers_only"]["ann_pj"] == pytest.approx(ann_spiking)
    assert e["spiking_layers_only"]["snn_pj"] == pytest.approx(snn_spiking)
    assert e["snn_over_ann"] == pytest.approx((snn_spiking + common) / (ann_spiking + common))
    assert e["ann_pj_per_token"] == pytest.approx((ann_spiking + common) / 4)
    narrow = integer_estimate(TOTALS, IntegerModel(weight_bits=8, accumulator_bits=16), EnergyModel(), tokens=4)
    assert narrow["spiking_layers_only"]["snn_pj"] == pytest.approx(snn_spiking / 2)  # 16-bit adds: half
    assert "⌈log2 levels⌉" in e["convention"]["text"] and "Horowitz" in e["convention"]["text"]


def test_memory_view_by_hand():
    compute = {"ann_pj": 1000.0, "snn_pj": 800.0}
    m = memory_traffic(TOTALS, MemoryModel(), compute, tokens=4)
    sram, dram = 5 / 4, 640 / 4  # pJ per byte
    ann_act, snn_act = 6 * 4, 30 * 2 / 8  # dense fp32 inputs; 2-bit spikes per neuron per step
    # weights on chip: one 4-byte SRAM read per MAC / per synaptic AC (the float MACs alike in both)
    ann_w, snn_w = (100 + 5) * 4, (150 + 5) * 4
    assert m["stationary"]["ann"]["weight_bytes_per_token"] == pytest.approx(ann_w / 4)
    assert m["stationary"]["snn"]["activation_bytes_per_token"] == pytest.approx(snn_act / 4)
    assert m["stationary"]["ann"]["total_pj_per_token"] == pytest.approx((1000 + (ann_w + ann_act) * sram) / 4)
    assert m["stationary"]["snn"]["total_pj_per_token"] == pytest.approx((800 + (snn_w + snn_act) * sram) / 4)
    # streamed: all 48 weights from DRAM once per pass (2 passes); the SNN's 40 spiking ones once per step (T=5)
    ann_w, snn_w = 48 * 2 * 4, (40 * 5 + 8) * 2 * 4
    assert m["streamed"]["snn"]["memory_pj_per_token"] == pytest.approx((snn_w * dram + snn_act * sram) / 4)
    assert m["streamed"]["snn_over_ann"] == pytest.approx((800 + snn_w * dram + snn_act * sram)
                                                          / (1000 + ann_w * dram + ann_act * sram))
    with pytest.raises(ConfigError):
        MemoryModel(e_dram_pj_per_byte=-1)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_report_json_names_data_and_holds_three_views(exported, tmp_path):  # noqa: F811
    out = tmp_path / "rep"
    result = run("report", exported, "--data", HELDOUT, "--out", out, "--max-tokens", 32, "--seq-len", 16,
                 "--e-dram", 100, "--weight-bits", 8, "--e-neuron", 0.5)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["data"] == HELDOUT and f"text `{HELDOUT}`" in (out / "report.md").read_text()
    assert HELDOUT in result.output and "(ii) vs integer ANN" in result.output
    run0 = data["runs"][0]
    assert run0["energy"]["snn_over_ann"] > 0 and run0["energy"]["view"] == "i"  # users' scripts read this key
    assert run0["energy_integer"]["snn_over_ann"] > run0["energy"]["snn_over_ann"]  # integer MACs are cheap
    conventions = data["energy_conventions"]
    assert conventions["iii"]["e_dram_pj_per_byte"] == 100 and conventions["ii"]["weight_bits"] == 8
    assert conventions["i"]["e_neuron_pj"] == 0.5 and "8-bit weights" in conventions["ii"]["text"]
    streamed = run0["memory"]["streamed"]
    # the SNN streams its spiking weights once per step: T times the ANN's, and the float lm_head once, as the ANN
    synapses = [m for m in run0["modules"].values() if m["kind"] == "synapsis"]
    extra = sum(m["weights"] * (m["timesteps"] - 1) for m in synapses)  # each over its input's own window
    assert extra >= run0["totals"]["spiking_weights"]  # every window at least one step
    assert streamed["snn"]["weight_bytes_per_token"] - streamed["ann"]["weight_bytes_per_token"] == pytest.approx(
        extra * run0["totals"]["passes"] * 4 / data["tokens_processed"])


def test_overwrite_replaces_a_report_and_nothing_else(exported, tmp_path):  # noqa: F811
    out = tmp_path / "rep"
    args = ["report", exported, "--data", HELDOUT, "--out", out, "--max-tokens", 16, "--seq-len", 16]
    assert run(*args).exit_code == 0
    (out / "report.md").write_text("stale")
    again = run(*args)
    assert again.exit_code == 2 and "--overwrite" in again.output and (out / "report.md").read_text() == "stale"
    replaced = run(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "report.md").read_text() != "stale" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    refused = run("report", exported, "--data", HELDOUT, "--out", mine, "--overwrite")
    assert refused.exit_code == 2 and "not an ann2snn report" in refused.output
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("report", exported, "--data", HELDOUT, "--out", empty, "--max-tokens", 16, "--seq-len", 16).exit_code == 0
    assert (empty / "report.json").is_file()


@pytest.fixture(scope="module")
def finetuned(exported, tmp_path_factory):  # noqa: F811
    """The export with a recorded fine-tune (thresholds moved), saved as `ann2snn finetune` saves it."""
    model = ann2snn.load(exported)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.neuron.delta.mul_(1.5)
    model.ann2snn["finetune"] = {"rule": "distill", "steps": 1}
    return ann2snn.save(model, tmp_path_factory.mktemp("ft") / "ft", ann2snn.load_tokenizer(exported))


def test_a_finetuned_export_is_not_rebuilt_silently(finetuned, tmp_path):
    out = tmp_path / "rep"
    result = run("report", finetuned, "--data", HELDOUT, "--out", out, "--timesteps", "3,4")
    assert result.exit_code == 2 and not out.exists()
    assert "fine-tuned (distill)" in result.output and "lose the fine-tune" in result.output
    with pytest.raises(ConfigError, match="lose the fine-tune"):
        rebuild_at(finetuned, 4)
    own = run("report", finetuned, "--data", HELDOUT, "--out", out, "--max-tokens", 16, "--seq-len", 16)
    assert own.exit_code == 0, own.output
    assert json.loads((out / "report.json").read_text())["runs"][0]["finetuned"] is True
    assert "This export was fine-tuned" in (out / "report.md").read_text()


def test_attention_sink_products_are_counted_on_the_spikes_that_drive_them():
    """q spikes select rows of the sink's constant keys (1 sink token: 1 AC each); the sink probability's spikes
    rows of its constant values (head_dim ACs each); the ANN has no sink."""
    from spikingjelly.activation_based.op_counter import ModuleCounterMode

    from ann2snn.modules.attention import SpikingAttention
    from ann2snn.modules.neuron import set_simulation
    from ann2snn.report import SNN_FIELDS, CountCache, SpikeFieldCounter

    torch.manual_seed(0)
    heads, kv_heads, dim, length = 2, 1, 4, 3
    attention = SpikingAttention(SpikeCode("rate", 3), heads, kv_heads, dim, torch.full((heads, dim), 0.5),
                                 torch.full((kv_heads, dim), 0.5), torch.full((kv_heads, dim), 0.5),
                                 sink=(torch.randn(kv_heads, 1, dim), torch.randn(kv_heads, 1, dim)), sink_tokens=1)
    query, key, value = torch.randn(1, heads, length, dim), torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim)
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None]
    cache = CountCache()
    counters = {field: SpikeFieldCounter(field, cache) for field in SNN_FIELDS}
    set_simulation(attention, "step")
    trains = {}
    hooks = cache.watch_attention(attention) + [
        attention.q_neuron.register_forward_hook(lambda m, a, out: trains.__setitem__("q", out)),
        attention.softmax.neuron.register_forward_hook(lambda m, a, out: trains.__setitem__("p", out))]
    with torch.no_grad(), ModuleCounterMode(list(counters.values()), model=attention):
        attention(query, key, value, mask, dim ** -0.5)
    for hook in hooks:
        hook.remove()
    at = lambda field, name: sum(counters[field].get_counts().get(f"SpikingAttention.{name}", {}).values())  # noqa: E731
    q_spikes = int(trains["q"].spikes.ne(0).sum())
    sink_prob_spikes = int(trains["p"].spikes[..., :1].ne(0).sum())
    assert q_spikes > 0 and sink_prob_spikes > 0
    assert at("ac", "q_neuron") == q_spikes * 1 and at("shifts", "q_neuron") == 0  # rate code: no shifts
    assert at("ac", "softmax.neuron") == sink_prob_spikes * dim
    # every query sees the sink: its neurons exist beside the visible keys (6 of 9) for each of the 2 heads
    assert at("neuron_inputs", "softmax.neuron") == heads * (length + 6)


def test_report_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    import errno

    import ann2snn.atomic
    from ann2snn.errors import ConfigError
    from ann2snn.report.render import check_out

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ann2snn.atomic.tempfile, "mkstemp", denied)
    with pytest.raises(ConfigError, match="Permission denied") as caught:
        check_out(tmp_path / "report")
    assert "free disk space" not in str(caught.value) and not (tmp_path / "report").exists()
