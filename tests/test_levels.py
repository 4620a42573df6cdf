"""Per-site levels: each site's T chosen from calibration under one budget; exports, step simulation and the report."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import ann2snn
from ann2snn.calibration import levels
from ann2snn.calibration.calibrate import PROBE, WINDOWS
from ann2snn.calibration.data import PROBE_WINDOWS
from ann2snn.calibration.levels import MIN_TIMESTEPS, PROBE_MARGIN, UNIFORM_KL_FACTOR, UNLIKE_TEXT_MARGIN
from ann2snn.convert import calibrate
from ann2snn.cli import main
from ann2snn.errors import CheckpointError, ConfigError
from ann2snn.export import config_digest
from ann2snn.modules.attention import SNNMatmul, snn_matmul
from ann2snn.modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from ann2snn.recipes import get_recipe
from ann2snn.replace import swap_modules
from ann2snn.report import build_report

T = 6
LOOSE = 1.001  # on the small random model: about half the steps go, every site keeps at least 2


@pytest.fixture(scope="module")
def calibrated(qwen2_checkpoint):
    model, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    statistics, info = calibrate(model, tokenizer, calib_samples=8, seq_len=32, progress=False)
    return qwen2_checkpoint, statistics, info


def converted(calibrated, **options):
    folder, statistics, info = calibrated
    model, _ = ann2snn.load_ann(str(folder))
    return ann2snn.convert(model, timesteps=T, statistics=statistics, calibration_info=info, progress=False, **options)


def base_timesteps(neuron: SignedNeuron) -> int:
    """The neuron's T without its range steps (its window is T + range steps below 23 steps)."""
    return neuron.code.timesteps - neuron.code.range_steps


def neurons(model) -> dict[str, SignedNeuron]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SignedNeuron)}


@pytest.fixture(scope="module")
def mixed(calibrated):
    return converted(calibrated, max_ppl_ratio=LOOSE)


def test_every_site_gets_a_t_within_its_range_and_the_export_config_lists_them(mixed):
    found = {base_timesteps(n) for n in neurons(mixed).values()}
    assert min(found) >= MIN_TIMESTEPS and max(found) <= T
    assert len(found) > 1  # mixed: some sites went below T, some did not
    listed = mixed.ann2snn["site_timesteps"]
    assert listed and all(MIN_TIMESTEPS <= t < T for t in listed.values())
    assert mixed.ann2snn["allocation"]["added_kl"] <= mixed.ann2snn["allocation"]["allowed_kl"]
    assert mixed.ann2snn["recipe"]["level_allocation"] == "auto"
    # each listed site is one neuron (q_proj's site is the q/k/v group's shared neuron), at the listed T
    below = sorted(base_timesteps(n) for n in neurons(mixed).values() if base_timesteps(n) < T)
    assert below == sorted(listed.values())


def test_levels_are_per_site_by_default_uniform_when_asked_and_a_budget_asks(calibrated, mixed):
    default = converted(calibrated)
    assert default.ann2snn["recipe"]["level_allocation"] == "auto" and default.ann2snn["recipe"]["max_ppl_ratio"] == 1.01
    uniform = converted(calibrated, levels="uniform")
    assert uniform.ann2snn["recipe"]["level_allocation"] == "uniform" and not uniform.ann2snn.get("site_timesteps")
    assert {base_timesteps(n) for n in neurons(uniform).values()} == {T}
    assert mixed.ann2snn["recipe"]["level_allocation"] == "auto"  # `mixed` passed only max_ppl_ratio


def test_a_tighter_budget_never_gives_less_energy(calibrated):
    saved = []
    for ratio in (1.0, 1.0001, LOOSE, 1.003, 2.0):
        summary = converted(calibrated, max_ppl_ratio=ratio).ann2snn["allocation"]
        assert summary["added_kl"] <= summary["allowed_kl"]
        saved.append(summary["energy_saved_pj_per_token"])
    assert saved == sorted(saved) and saved[-1] > 0  # looser budgets save as much or more
    # an energy budget: the allocation's predicted SNN/ANN energy meets it, and a lower one saves more
    low, high = (converted(calibrated, energy_budget=e).ann2snn["allocation"] for e in (0.3, 0.9))
    assert low["energy_saved_pj_per_token"] >= high["energy_saved_pj_per_token"]
    assert high["predicted_snn_over_ann"] <= 0.9


def test_the_allowed_kl_is_the_budget_over_the_margin_or_a_multiple_of_the_uniform_models_own(calibrated):
    """On the calibration windows the allocation may add ln R / UNLIKE_TEXT_MARGIN nats per token (what it adds on
    unlike text is a few times that), and never more than UNIFORM_KL_FACTOR × the uniform model's own KL."""
    tight, loose = (converted(calibrated, max_ppl_ratio=r).ann2snn["allocation"] for r in (1.0002, 2.0))
    assert tight["allowed_kl"] == pytest.approx(math.log(1.0002) / UNLIKE_TEXT_MARGIN)
    assert tight["allowed_kl"] < UNIFORM_KL_FACTOR * tight["uniform_kl"]  # the margin binds
    assert loose["allowed_kl"] == pytest.approx(UNIFORM_KL_FACTOR * loose["uniform_kl"])  # the uniform model's KL binds
    for summary in (tight, loose):
        assert 0 <= summary["added_kl"] <= summary["allowed_kl"]
    assert 0 < tight["energy_saved_pj_per_token"] < loose["energy_saved_pj_per_token"]


def test_the_probe_text_is_kept_with_the_calibration_and_bounds_the_allocation_too(calibrated, mixed):
    """Calibration keeps windows of the bundled probe text; the allocation stays within ln R / PROBE_MARGIN (or the
    multiple of the uniform model's KL) on them as well as on the calibration windows."""
    _, _, info = calibrated
    assert info[PROBE].shape == (PROBE_WINDOWS, info[WINDOWS].shape[1])
    assert not torch.equal(info[PROBE][0], info[WINDOWS][0])
    probe = mixed.ann2snn["allocation"]["probe"]  # the random model predicts the probe as well as its calibration text
    assert probe["tokens"] == info[PROBE][:, 1:].numel()
    assert probe["allowed_kl"] == pytest.approx(min(math.log(LOOSE) / PROBE_MARGIN, UNIFORM_KL_FACTOR * probe["uniform_kl"]))
    assert 0 <= probe["added_kl"] <= probe["allowed_kl"]


def test_each_sites_predicted_loss_is_the_larger_of_the_two_texts(calibrated):
    folder, statistics, info = calibrated
    model, _ = ann2snn.load_ann(str(folder))
    ctx = swap_modules(model, get_recipe("qwen2").with_options(timesteps=T), statistics)  # as convert builds it

    def predicted(texts):
        sites = levels._sites(model, ctx)
        levels._predict(model, sites, texts, levels.EnergyModel())
        return {site.name: site.loss for site in sites}

    calibration, probe = info[WINDOWS][:4], info[PROBE]
    alone, other, both = predicted([calibration]), predicted([probe]), predicted([calibration, probe])
    for name, loss in both.items():
        for t, value in loss.items():
            assert value == pytest.approx(max(alone[name][t], other[name][t]), rel=1e-5)
    assert any(alone[n][t] != other[n][t] for n in both for t in both[n])  # the two texts do differ


def test_a_lowered_site_is_offered_its_own_range_and_the_level_tables_clip(calibrated):
    """Each site at a lower T may keep the range of its own T (fewer levels, no more clipping: what new text drives
    past a clip fitted at few levels, it cannot lose there) or take the level table's clip at that T, where the two
    differ; the path picks whichever buys more energy per predicted loss."""
    folder, statistics, _ = calibrated
    model, _ = ann2snn.load_ann(str(folder))
    ctx = swap_modules(model, get_recipe("qwen2").with_options(timesteps=8), statistics)  # 511 levels: max ×2 …
    sites = levels._sites(model, ctx)
    fitted = 0
    for site in sites:
        top_code, top_delta = site.settings[site.start]
        huge = torch.full_like(top_delta, 1e30)
        reach = top_code.quantise(huge, top_delta)  # the largest value the site sends at its own T
        for (t, kind), (code, delta) in site.settings.items():
            sent = code.quantise(huge, delta)  # what this setting clips to
            if kind == "own":
                assert ((sent - reach).abs() <= delta * (1 + 1e-5)).all(), (site.name, t)
            else:
                fitted += 1
                assert t < site.top and not torch.equal(delta, site.settings[(t, "own")][1])
    assert fitted > 0  # … below them the level table's mse clip, tighter at some sites


class _Setting:
    """A site's neuron in the search test: it remembers the setting it was recoded to."""

    def __init__(self):
        self.t = 3

    def recode(self, code, delta):
        self.t = code


@pytest.mark.parametrize("skips", [0, 2])
def test_a_site_whose_move_alone_breaks_the_budget_is_left_and_the_search_goes_on(monkeypatch, skips):
    """Six sites, each predicted to cost the same and ordered by energy; the measured KL says site 2's move costs
    far beyond the budget and the others next to nothing. The search leaves site 2 at its T and lowers the rest;
    without skips it stops before site 2."""
    monkeypatch.setattr(levels, "SKIPS", skips)
    sites = [levels.Site(f"s{i}", _Setting(), 3, {(t, "own"): (t, None) for t in (2, 3)}, [],
                         {(3, "own"): 0.0, (2, "own"): 0.001}, {(3, "own"): 10.0 - i, (2, "own"): 0.0})
             for i in range(6)]
    true_cost = {i: (1.0 if i == 2 else 1e-4) for i in range(6)}

    class Reference:  # KL: 0.01 at every site's T, plus each lowered site's true cost
        def measure(self, model):
            kl = 0.01 + sum(true_cost[i] for i, site in enumerate(sites) if site.neuron.t == 2)
            return math.exp(kl), math.exp(kl)

    summary = {}
    path, chosen = levels._within_ratio(None, sites, levels._path(sites), [("calibration", Reference(), 4.0)],
                                        1.01, summary)
    lowered = {sites[i].name for i, _, _, _ in path[:chosen]}
    assert [sites[i].name for i, _, _, _ in levels._path(sites)] == [f"s{i}" for i in range(6)]  # the path's order
    assert lowered == ({"s0", "s1", "s3", "s4", "s5"} if skips else {"s0", "s1"})
    assert summary["skipped_sites"] == (["s2"] if skips else [])
    assert summary["added_kl"] == pytest.approx(len(lowered) * 1e-4) and summary["added_kl"] <= summary["allowed_kl"]


def test_a_model_that_does_not_predict_the_probe_is_allocated_from_its_calibration_text():
    """The embedded model knows English prose only (7.4 nats per token on the probe's code, 3.3 on its calibration
    text): the probe says nothing of what it is used on, and the summary says why it was left out."""
    ann, tokenizer = ann2snn.load_ann("qwen2-tiny")
    snn = ann2snn.convert(ann, tokenizer, timesteps=T, levels="auto", calib_samples=8, progress=False)
    allocation = snn.ann2snn["allocation"]
    assert "probe" not in allocation and "NLL on the probe text" in allocation["probe_skipped"]


def test_statistics_saved_before_the_probe_or_the_windows_say_what_the_allocation_lacks(calibrated):
    folder, statistics, info = calibrated
    older = {key: value for key, value in info.items() if key != PROBE}
    model, _ = ann2snn.load_ann(str(folder))
    with pytest.warns(UserWarning, match="no probe windows"):
        snn = ann2snn.convert(model, timesteps=T, statistics=statistics, calibration_info=older, progress=False)
    assert snn.ann2snn["recipe"]["level_allocation"] == "auto" and "probe" not in snn.ann2snn["allocation"]
    oldest = {key: value for key, value in older.items() if key != WINDOWS}
    model, _ = ann2snn.load_ann(str(folder))
    with pytest.warns(UserWarning, match="no token windows"):
        snn = ann2snn.convert(model, timesteps=T, statistics=statistics, calibration_info=oldest, progress=False)
    assert snn.ann2snn["recipe"]["level_allocation"] == "uniform" and not snn.ann2snn["site_timesteps"]


def test_step_simulation_equals_fast_with_mixed_timesteps(mixed):
    """Module by module: each neuron's train sums to the fast path's quantised value at its own T, and each spike
    product of two trains of unequal windows equals the product of what they carry. (End to end the logits then
    agree up to level flips where a value sits on a rounding boundary, which coarse levels make common.)"""
    assert len({base_timesteps(n) for n in neurons(mixed).values()}) > 1
    checked = {"neurons": 0, "products": 0, "unequal": 0}

    def neuron_hook(module, args, out):
        assert isinstance(out, SpikeTrain) and out.timesteps == module.code.timesteps
        assert torch.equal(out.accumulate(), module.code.quantise(args[0], module.delta))
        checked["neurons"] += 1

    def product_hook(module, args, out):
        a, b = args
        assert torch.allclose(out, snn_matmul(a.accumulate(), b.accumulate()), atol=1e-9, rtol=0)
        checked["products"] += 1
        checked["unequal"] += a.timesteps != b.timesteps

    model = mixed.double()
    handles = [m.register_forward_hook(neuron_hook) for m in neurons(model).values()]
    handles += [m.register_forward_hook(product_hook) for m in model.modules() if isinstance(m, SNNMatmul)]
    try:
        with torch.no_grad():
            set_simulation(model, "step")
            model(torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
        set_simulation(model, "fast")
        model.float()
    assert checked["neurons"] == len(neurons(model)) and checked["products"] == 4 and checked["unequal"] > 0


def test_an_export_with_mixed_timesteps_round_trips_and_a_damaged_list_is_refused(calibrated, mixed, tmp_path):
    folder = calibrated[0]
    _, tokenizer = ann2snn.load_ann(str(folder))
    ids = tokenizer("It was the best of times, it was the worst of times.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = mixed(ids).logits
    out = ann2snn.save(mixed, tmp_path / "snn", tokenizer)
    config = json.loads((out / "snn_config.json").read_text())
    assert config["format_version"] == 6 and config["site_timesteps"] == mixed.ann2snn["site_timesteps"]
    assert "windows" not in config["calibration"] and "probe_windows" not in config["calibration"]  # in calibration.safetensors
    loaded = ann2snn.load(out)
    assert {n: base_timesteps(m) for n, m in neurons(loaded).items()} == \
        {n: base_timesteps(m) for n, m in neurons(mixed).items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    # the allocation is recomputed from what the export saved: the same sites get the same T
    model, _ = ann2snn.load_ann(str(folder))
    again = ann2snn.convert(model, timesteps=T, calib_stats=out / "calibration.safetensors", max_ppl_ratio=LOOSE,
                            progress=False)
    assert again.ann2snn["site_timesteps"] == mixed.ann2snn["site_timesteps"]
    assert again.ann2snn["allocation"]["probe"] == mixed.ann2snn["allocation"]["probe"]  # the probe's windows were kept
    # a hand-edited list (re-hashed, so only its values are wrong) is refused by name
    # (above T: a site other than the head's input neuron, the only one that may fire more than T, test_head.py)
    listed = next(site for site in config["site_timesteps"] if site != "lm_head")
    for site, t in ((listed, T + 1), ("model.layers.9.mlp.act_fn", 3)):
        edited = dict(config, site_timesteps={**config["site_timesteps"], site: t})
        edited["config_sha256"] = config_digest(edited)
        (out / "snn_config.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match="site_timesteps"):
            ann2snn.load(out)


def test_the_report_counts_each_site_at_its_own_t(calibrated, mixed):
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    report = build_report(mixed, windows, progress=False)
    rows = {name: row for name, row in report["modules"].items() if row["kind"] == "neuron"}
    expected = 0
    for name, neuron in neurons(mixed).items():
        row = rows[name]
        assert row["timesteps"] == neuron.code.timesteps
        assert row["neuron_updates"] == row["neuron_inputs"] * neuron.code.timesteps
        expected += row["neuron_inputs"] * neuron.code.timesteps
    assert report["totals"]["neuron_updates"] == expected
    assert len({row["timesteps"] for row in rows.values()}) > 1
    assert report["site_timesteps"] == mixed.ann2snn["site_timesteps"]
    uniform = build_report(converted(calibrated, levels="uniform"), windows, progress=False)
    assert report["totals"]["neuron_updates"] < uniform["totals"]["neuron_updates"]
    assert report["energy"]["snn_over_ann"] < uniform["energy"]["snn_over_ann"]


@pytest.mark.parametrize("args, named", [
    (["--max-ppl-ratio", "0.99"], "max-ppl-ratio"), (["--max-ppl-ratio", "nan"], "max-ppl-ratio"),
    (["--energy-budget", "0"], "energy-budget"), (["--energy-budget", "-1"], "energy-budget"),
    (["--max-ppl-ratio", "1.01", "--energy-budget", "0.4"], "not both"),
    (["--levels", "uniform", "--max-ppl-ratio", "1.01"], "levels auto"),
    (["--levels", "some"], "levels"),
])
def test_bad_level_options_are_refused_in_one_line(qwen2_checkpoint, tmp_path, args, named):
    out = tmp_path / "snn"
    result = CliRunner().invoke(main, ["convert", str(qwen2_checkpoint), "--out", str(out), *args])
    assert result.exit_code == 2 and named in result.output
    if "some" not in args:  # click's own usage error aside, one line naming the option
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_library_refuses_the_same_values():
    for options in ({"max_ppl_ratio": 0.5}, {"energy_budget": float("inf")}, {"levels": "fine"},
                    {"max_ppl_ratio": 1.01, "energy_budget": 0.5}, {"levels": "uniform", "energy_budget": 0.5}):
        with pytest.raises(ConfigError):
            ann2snn.convert(None, **options)
