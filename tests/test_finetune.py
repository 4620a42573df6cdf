"""Plasticity fine-tuning: the STE/LSQ maths, the STDP window and traces, and on the embedded model that
distill shrinks the held-out gap to the ANN, stdp does not grow it, a run resumes from its checkpoint,
and `ann2snn finetune` writes an export that loads."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import ann2snn
from ann2snn.calibration.data import bundled_text, read_texts, token_windows
from ann2snn.cli import main
from ann2snn.coding import SpikeCode
from ann2snn.errors import ConfigError
from ann2snn.evaluate import compare, logits_over, perplexity as ppl
from ann2snn.finetune import HoldoutWarning, finetune
from ann2snn.finetune import core, distill as distill_module, holdout as holdout_module
from ann2snn.finetune.ste import calibrated_neurons, differentiable_neurons, ste_quantise
from ann2snn.finetune.common import swapped_weights, synapses, synaptic_parameters
from ann2snn.finetune.stdp import Stdp, StdpOptions, stdp_window
from ann2snn.models import embedded_model_path
from ann2snn.modules.neuron import SignedNeuron

pytestmark = pytest.mark.skipif(not (embedded_model_path() / "model.safetensors").is_file(),
                                reason="the embedded qwen2-tiny model is not built")

SEQ = 64
TRAIN = [bundled_text("train.txt").read_text()[:60000]]  # fine-tuning text: Austen, as the model's training text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads that wait for each other cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """qwen2-tiny at phase coding, T=3 — where conversion alone leaves a clear perplexity gap.

    Calibrated on a slice of the training text with max thresholds, to keep the test fast.
    """
    torch.manual_seed(0)
    ann, tokenizer = ann2snn.load_ann("qwen2-tiny")
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(TRAIN[0])
    snn = ann2snn.convert(ann, tokenizer, coding="phase", timesteps=3, threshold="max", calib_data=calib,
                          calib_samples=8, seq_len=SEQ, progress=False)
    held_out = token_windows(tokenizer, read_texts(bundled_text("heldout.txt")), SEQ, max_tokens=2048)
    return snn, tokenizer, held_out, compare(snn, held_out)


def _snn_perplexity(model, windows, simulation="fast"):
    perplexity = ppl(logits_over(model, windows, simulation), windows)
    ann2snn.set_simulation(model, "fast")
    return perplexity


def _nll_windows(model, windows):
    """The SNN's mean next-token NLL of each window ("fast" simulation)."""
    logits = logits_over(model, windows, "fast")
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(-1)


def _copy(snn):
    model = copy.deepcopy(snn)
    model.ann2snn = snn.ann2snn
    return model


# --- the maths, on tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("code", [SpikeCode("phase", 3), SpikeCode("rate", 8)], ids=lambda c: f"{c.name}{c.timesteps}")
def test_ste_forward_is_the_quantiser_and_backward_is_lsq(code):
    torch.manual_seed(0)
    L = code.max_count
    x = (torch.randn(5, 7, 6) * 3).double().requires_grad_(True)
    step = (torch.rand(6) * 0.3 + 0.2).double().requires_grad_(True)
    out = ste_quantise(x, step, L)
    assert torch.equal(out.detach(), code.quantise(x.detach(), step.detach()))
    grad = torch.randn_like(out)
    out.backward(grad)
    u = (x / step).detach()
    inside = (u.abs() <= L)
    k = code.quantise_counts(x.detach(), step.detach())
    assert torch.equal(x.grad, grad * inside)  # identity inside the clip, zero outside
    assert torch.allclose(step.grad, (grad * torch.where(inside, k - u, k)).sum((0, 1)))  # LSQ


def test_differentiable_neurons_train_log_steps_and_write_them_back(converted):
    snn, tokenizer, held_out, _ = converted
    model = _copy(snn)
    neurons = dict(calibrated_neurons(model))
    before = {name: n.delta.clone() for name, n in neurons.items()}
    with differentiable_neurons(model) as trained:
        assert set(trained.log_deltas) == set(neurons)
        ann2snn.set_simulation(model, "fast")
        model(input_ids=held_out[:1]).logits.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.parameters())
        assert sum(float(p.grad.abs().sum()) for p in trained.parameters()) > 0
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(0.1)
    for name, neuron in neurons.items():
        assert "forward" not in neuron.__dict__  # the class forward is back
        assert torch.allclose(neuron.delta, before[name] * torch.exp(torch.tensor(0.1)), rtol=1e-5)


def test_per_neuron_scales_move_all_channels_and_are_written_back(converted):
    snn, tokenizer, held_out, _ = converted
    model = _copy(snn)
    neurons = dict(calibrated_neurons(model, softmax=True))
    assert len(neurons) == len(calibrated_neurons(model)) + model.config.num_hidden_layers  # + one softmax clip a layer
    before = {name: n.delta.clone() for name, n in neurons.items()}
    with differentiable_neurons(model, softmax=True, scales=True) as trained:
        assert set(trained.log_scales) == set(neurons) and all(p.shape == () for p in trained.scale_parameters())
        ann2snn.set_simulation(model, "fast")
        model(input_ids=held_out[:1]).logits.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad) for p in trained.scale_parameters())
        with torch.no_grad():
            for p in trained.scale_parameters():
                p.add_(-0.2)
    for name, neuron in neurons.items():
        assert torch.allclose(neuron.delta, before[name] * torch.exp(torch.tensor(-0.2)), rtol=1e-5)


def test_thresholds_that_did_not_move_are_handed_back_to_the_bit(converted):
    """exp(log Δ) is not always Δ in float32: a run that ends where it started (distill's early stopping when no
    evaluation beat the start) must hand back the very SNN it was given, not one an ulp away on some channels."""
    snn, _, _, _ = converted
    model = _copy(snn)
    neurons = dict(calibrated_neurons(model))
    before = {name: n.delta.clone() for name, n in neurons.items()}
    round_trip = [(b.float().clamp_min(1e-30).log().exp() != b.float()).sum() for b in before.values()]
    assert sum(int(r) for r in round_trip) > 0  # the round trip alone would move some channels
    moved = sorted(neurons)[0]
    with differentiable_neurons(model, scales=True) as trained:
        with torch.no_grad():
            trained.log_deltas[moved][..., 0] += 0.1  # one channel of one neuron moves; nothing else does
    for name, neuron in neurons.items():
        same = neuron.delta == before[name]
        if name == moved:
            assert not same.reshape(-1)[0] and same.reshape(-1)[1:].all()
        else:
            assert torch.equal(neuron.delta, before[name]), name


def test_stdp_window_signs_and_flat_window_gives_the_delta_rule():
    code = SpikeCode("phase", 3)
    own, nxt = stdp_window(code, a_plus=1.0, a_minus=0.5, tau_plus=2.0, tau_minus=2.0)
    assert (own > 0).all()  # within a token, pre always fires a window before post: causal
    post, pre = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    assert (nxt[post == pre] == 0).all() and (nxt[post > pre] > 0).all() and (nxt[post < pre] < 0).all()
    assert torch.isclose(own[0, 2], torch.exp(torch.tensor(-1 / 2)))  # Δt = T + 0 − 2 = 1
    # with a flat causal window and one token per sequence (no next-token pairs), Ê ∝ Σ_p e_p x̂_pᵀ: the LMS step,
    # normalised by the layer's input power (normalised LMS) or by each input's own
    torch.manual_seed(0)
    x = torch.randn(10, 1, 6)
    neuron = SignedNeuron(code, 6, torch.full((6,), 0.2))
    pre = neuron.fire(x, neuron.delta)
    error = torch.randn(10, 1, 4) * 0.01
    x_hat = pre.accumulate()
    e_hat = code.quantise(error, (error.abs().reshape(-1, 4).amax(0) / code.max_count))
    delta_rule = e_hat.reshape(-1, 4).t() @ x_hat.reshape(-1, 6) / 10
    power = {"layer": x_hat.pow(2).sum(-1).mean(), "synapse": 6 * x_hat.pow(2).reshape(-1, 6).mean(0)}
    for normalise in ("layer", "synapse"):
        rule = _flat_window_rule(normalise)
        assert torch.allclose(rule.eligibility(pre, error, code), delta_rule / power[normalise], rtol=1e-4, atol=1e-9)


def _flat_window_rule(normalise: str) -> Stdp:
    rule = Stdp.__new__(Stdp)
    rule.options = StdpOptions(a_plus=1.0, a_minus=0.0, tau_plus=1e12, tau_minus=1e12, normalise=normalise)
    rule._windows = {}
    return rule


def test_stdp_normalised_per_input_neuron_stays_stable_where_one_input_dominates():
    """Inputs like SmolLM2's residual stream (one channel 30x the others): the local delta rule, iterated at η = 4,
    diverges with the layer's normaliser (η·λ_max > 2·mean‖x̂‖²) and shrinks the layer's error with each input's."""
    code = SpikeCode("phase", 4)
    torch.manual_seed(0)
    x = torch.randn(64, 8, 12)
    x[..., 0] *= 30
    neuron = SignedNeuron(code, 12, x.abs().reshape(-1, 12).amax(0) / code.max_count)
    pre = neuron.fire(x, neuron.delta)
    x_hat = pre.accumulate()
    original = torch.randn(5, 12) * 0.1
    errors = {}
    for normalise in ("layer", "synapse"):
        rule, weight = _flat_window_rule(normalise), original.clone()
        history = []
        for _ in range(6):
            error = x @ original.t() - x_hat @ weight.t()  # the local teacher: W₀ on the float input, minus the output
            history.append(float(error.pow(2).mean()))
            weight += 4.0 * rule.eligibility(pre, error, code)
        errors[normalise] = history
    assert errors["layer"][-1] > 100 * errors["layer"][0]
    synapse = errors["synapse"]  # measured: 0.0233 falling to 0.0225 (the rest is rounding no weight can undo)
    assert all(b < a for a, b in zip(synapse, synapse[1:])) and synapse[-1] < 0.98 * synapse[0], errors


# --- on the embedded model --------------------------------------------------------------------------

@pytest.mark.parametrize("train_weights", [True, False])
def test_distill_shrinks_the_held_out_gap(converted, train_weights):
    """The default trains weights and thresholds; train_weights=False the thresholds only."""
    snn, tokenizer, held_out, before = converted
    model = _copy(snn)
    original = {name: p.clone() for name, p in synaptic_parameters(model).items()}
    figures = finetune(model, tokenizer, TRAIN, rule="distill", steps=30, seq_len=SEQ, progress=False,
                       **({} if train_weights else {"train_weights": False}))
    after = _snn_perplexity(model, held_out)
    gap_before = before["ppl_snn"] - before["ppl_ann"]
    gap_after = after - before["ppl_ann"]
    assert gap_before > 0.05 * before["ppl_ann"]  # the setting leaves a real gap
    assert gap_after < 0.75 * gap_before, (before, after)  # thresholds only: measured 0.61 (the former defaults: 0.90)
    assert figures["kl_after"] < figures["kl_before"] and figures["thresholds_changed"] > 0
    # the guard's figures are the SNN's NLL change on the bundled probe text, in windows of 64 tokens, paired
    probe = token_windows(tokenizer, read_texts(bundled_text("probe.txt")), holdout_module.GUARD_SEQ_LEN)
    fall = _nll_windows(snn, probe) - _nll_windows(model, probe)
    assert figures["guard"] == "bundled probe.txt" and figures["guard_fall_windows_better"] == [int((fall > 0).sum()), len(probe)]
    assert figures["guard_fall_nats"] == pytest.approx(float(fall.mean()), abs=1e-5)
    weights_moved = any(not torch.equal(p, original[name]) for name, p in synaptic_parameters(model).items())
    assert figures["train_weights"] is train_weights and weights_moved is train_weights
    assert (figures["mean_abs_dw"] > 0) is train_weights
    # still an exact SNN: on this text every neuron's spike train carries exactly the value fast simulation
    # quantises its input to, at the fine-tuned steps
    inputs = {}
    hooks = [neuron.register_forward_hook(lambda neuron, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name, neuron in model.named_modules() if isinstance(neuron, SignedNeuron)]
    with torch.no_grad():
        model(held_out[:1])
    for hook in hooks:
        hook.remove()
    assert inputs
    for name, x in inputs.items():
        neuron = model.get_submodule(name)
        delta = neuron.current_delta(x)
        assert torch.equal(neuron.fire(x, delta).accumulate(), neuron.code.quantise(x, delta)), name
    # The whole network's step simulation sums each Synapsis over its time steps, fast simulation in one product:
    # equal up to float rounding, which tips values that sit within an ulp of a level boundary downstream. How
    # many sit there after a fine-tune depends on the CPU's kernels (measured 0.55 % of perplexity on one
    # machine, under 0.1 % on others).
    fast = _snn_perplexity(model, held_out[:1])
    assert abs(_snn_perplexity(model, held_out[:1], "step") - fast) < 1e-2 * fast


def test_distill_backs_off_rates_that_diverge_and_then_learns(converted):
    """Rates far too large make the holdout KL rise above the start's: without back-off the run never beats its start
    and ends there (undone, byte-identical); with it every rate is divided by 4 at each such evaluation until it
    learns."""
    snn, tokenizer, _, _ = converted
    runs = {}
    for backoffs in (0, 3):
        model = _copy(snn)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        runs[backoffs] = finetune(model, tokenizer, TRAIN, rule="distill", steps=30, seq_len=SEQ, progress=False,
                                  lr=1.0, weight_lr=3e-2, eval_every=5, max_backoffs=backoffs)
        unchanged = all(torch.equal(original[k], v) for k, v in model.state_dict().items())
        assert unchanged is runs[backoffs]["reverted"]
    never = runs[0]
    assert never["rate_backoffs"] == 0 and never["final_rates"] == [1.0, 1.0, 3e-2]
    assert never["last_loss"] > never["first_loss"]  # it diverged ...
    assert never["best_holdout_kl"] == never["start_holdout_kl"] and never["reverted"]  # ... and ended where it began
    backed = runs[3]
    n = backed["rate_backoffs"]
    assert n >= 1 and backed["final_rates"] == pytest.approx([1.0 / 4 ** n, 1.0 / 4 ** n, 3e-2 / 4 ** n])
    assert backed["best_holdout_kl"] < 0.95 * backed["start_holdout_kl"]  # measured: 0.89 after 3 back-offs
    assert backed["kl_after"] < backed["kl_before"]


def test_distill_weight_rate_follows_the_scale_of_the_weights_unless_given(converted):
    """Adam moves a weight by about its rate whatever the weight's size: by default the rate is a share of the
    model's mean |w|, so weights ten times larger get a rate ten times larger; a given weight_lr is used as it is."""
    snn, tokenizer, _, _ = converted
    rates = {}
    cases = (("as converted", 1.0, {}), ("weights x10", 10.0, {}), ("given", 1.0, {"weight_lr": 3e-5}))
    for case, scale, given in cases:
        model = _copy(snn)
        with torch.no_grad():
            for param in synaptic_parameters(model).values():
                param.mul_(scale)
        figures = finetune(model, tokenizer, TRAIN, steps=1, seq_len=SEQ, progress=False, eval_every=0, force=True,
                           **given)
        assert figures["final_rates"][-1] == figures["weight_lr"]  # the rate Adam was given for the weights
        rates[case] = (figures["weight_lr"], figures["mean_abs_w"])
    rate, scale = rates["as converted"]
    assert rate == pytest.approx(distill_module.DistillOptions().relative_weight_lr * scale) and 0 < scale < 1
    assert rates["weights x10"][1] == pytest.approx(10 * scale) and rates["weights x10"][0] == pytest.approx(10 * rate)
    assert rates["given"][0] == 3e-5
    thresholds_only = finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, progress=False, eval_every=0,
                               force=True, train_weights=False)
    assert thresholds_only["weight_lr"] is None and len(thresholds_only["final_rates"]) == 2


def test_distill_rates_follow_the_level_spacing_of_the_code(converted):
    """The rates are T = 4's: a finer code leaves a smaller gap, so at phase T = 8 (255 counts a side against 15)
    every rate — thresholds, scales, weights — is 15/255 as large; T <= 4, or rates_follow_levels=False, keeps them."""
    snn, tokenizer, _, _ = converted  # phase T = 3
    quick = dict(steps=1, seq_len=SEQ, progress=False, eval_every=0, force=True)
    at3 = finetune(_copy(snn), tokenizer, TRAIN, **quick)
    assert at3["rate_factor"] == 1.0 and at3["final_rates"][:2] == [3e-2, 3e-2]
    ann, _ = ann2snn.load_ann("qwen2-tiny")
    at8 = ann2snn.convert(ann, tokenizer, timesteps=8, levels="uniform", calib_samples=4, seq_len=SEQ, progress=False)
    on, off = (finetune(_copy(at8), tokenizer, TRAIN, rates_follow_levels=follow, **quick) for follow in (True, False))
    assert off["rate_factor"] == 1.0 and off["final_rates"][:2] == [3e-2, 3e-2]
    assert on["rate_factor"] == pytest.approx(15 / 255)
    assert on["final_rates"] == pytest.approx([rate * 15 / 255 for rate in off["final_rates"]]) and len(on["final_rates"]) == 3
    with pytest.raises(ConfigError, match="rates_follow_levels"):
        finetune(_copy(snn), tokenizer, TRAIN, rates_follow_levels="yes", **quick)


def test_mix_adds_bundled_prose_to_the_training_windows_and_the_holdout_in_the_same_share(converted):
    snn, tokenizer, _, _ = converted
    runs = [finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, progress=False, eval_every=0, force=True,
                     mix=mix) for mix in (0.0, 0.25)]
    plain, mixed = runs
    assert plain["mixed_windows"] == 0 and mixed["mixed_windows"] == round(plain["train_windows"] / 3)
    assert mixed["train_windows"] == plain["train_windows"] + mixed["mixed_windows"]
    assert plain["mixed_held_out_windows"] == 0 and plain["own_fall_nats"] is None
    assert mixed["mixed_held_out_windows"] == round(plain["held_out_windows"] / 3)
    assert mixed["held_out_windows"] == plain["held_out_windows"] + mixed["mixed_held_out_windows"]
    assert mixed["holdout"] == plain["holdout"] and mixed["held_out_tokens"] > plain["held_out_tokens"]
    assert mixed["own_fall_windows_better"][1] == plain["fall_windows_better"][1]  # the user's deciding windows
    with pytest.raises(ConfigError, match="mix must be a share"):
        finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, mix=1.0)
    with pytest.raises(ConfigError, match="pass a smaller mix"):
        finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, mix=0.99, progress=False)


def test_stdp_keeps_updates_that_help_on_the_holdout_and_never_grows_the_gap(converted):
    snn, tokenizer, held_out, before = converted
    model = _copy(snn)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    figures = finetune(model, tokenizer, TRAIN, rule="stdp", steps=16, seq_len=SEQ, progress=False)  # 2 updates of 8 batches
    assert figures["updates_kept"] + figures["updates_undone"] == 2
    assert figures["updates_kept"] >= 1  # an update that lowered the KL on the holdout's selection half (measured: 2)
    after = _snn_perplexity(model, held_out)
    assert after - before["ppl_ann"] <= before["ppl_snn"] - before["ppl_ann"], (before, after)
    better, windows = figures["fall_windows_better"]
    beyond = figures["fall_nats"] > 0 and (figures["fall_nats"] > figures["fall_noise_nats"]
                                           or better - windows / 2 > 2 * windows ** 0.5 / 2)
    if figures["reverted"]:  # the deciding half did not confirm the gain beyond chance: nothing of it is kept
        assert not beyond
        assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    else:
        assert beyond and figures["mean_abs_dw"] > 0


@pytest.mark.parametrize("options", [{}, {"train_weights": False}], ids=["weights", "thresholds"])
def test_stdp_learns_and_ends_in_the_state_that_did_best_on_the_selection_half(converted, monkeypatch, options):
    """Every update is applied; the run ends where the holdout's selection half had its lowest KL (early stopping),
    and that KL is lower than the converted SNN's: the rule learns (weights and thresholds, or thresholds only)."""
    snn, tokenizer, _, _ = converted
    seen: dict[int, list] = {}  # every holdout measured, by object: [holdout, its KL at each evaluation]
    real_evaluate = holdout_module.Holdout.evaluate

    def recording(self):
        figures = real_evaluate(self)
        seen.setdefault(id(self), [self, []])[1].append(figures.kl)
        return figures

    monkeypatch.setattr(holdout_module.Holdout, "evaluate", recording)
    # keep the run, whatever the deciding half says
    monkeypatch.setattr(core, "improvement", lambda after, before: holdout_module.Difference(1.0, 0.0, 1, 1))
    model = _copy(snn)
    figures = finetune(model, tokenizer, TRAIN, rule="stdp", steps=24, seq_len=SEQ, progress=False, **options)  # 3 updates
    select, kls = max(seen.values(), key=lambda entry: len(entry[1]))  # the selection half: measured after every update
    assert len(kls) == 1 + 3  # the converted state, then each update
    best = min(range(len(kls)), key=kls.__getitem__)
    assert figures["updates_kept"] == best and figures["updates_undone"] == 3 - best
    assert real_evaluate(select).kl == pytest.approx(kls[best], abs=1e-7)  # the model is in that state
    assert kls[best] < 0.97 * kls[0], kls  # measured: 0.891 (weights and thresholds), 0.943 (thresholds only)
    converted_weights = synaptic_parameters(snn)
    weights_moved = any(not torch.equal(p, converted_weights[name]) for name, p in synaptic_parameters(model).items())
    assert weights_moved is options.get("train_weights", True) and figures["thresholds_changed"] > 0


@pytest.mark.parametrize("teacher", ["local", "network"])
def test_stdp_teaching_current_is_desired_minus_actual(converted, teacher):
    """local: y* = W₀·x + b on the Synapsis' own float input; network: y* = the same layer's output in the ANN."""
    snn, tokenizer, held_out, _ = converted
    model = _copy(snn)
    synaptic = synaptic_parameters(model)
    originals = {name: p.detach().clone() for name, p in synaptic.items()}
    with torch.no_grad():  # the weights have drifted from W₀: the teacher must use W₀, the output the drifted ones
        for name, param in synaptic.items():
            param.mul_(1.01)
    rule = Stdp(model, StdpOptions(teacher=teacher), lr=8.0, steps=1, synaptic=synaptic, originals=originals, holdout=None)
    name, synapsis = synapses(model)[3]
    errors, seen = [], {}
    rule.eligibility = lambda pre, error, code: errors.append(error) or torch.zeros(1)
    ids = held_out[:2]
    hook = synapsis.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), y=out.detach()))
    rule.collect(ids)
    hook.remove()
    error = errors[3]
    if teacher == "local":
        desired = F.linear(seen["x"], originals[f"{name}.synapse.weight"], synapsis.synapse.bias)
    else:
        with torch.no_grad(), swapped_weights(synaptic, originals):
            ann2snn.set_simulation(model, "ann")
            hook = synapsis.register_forward_hook(lambda m, a, out: seen.update(ann=out.detach()))
            model(input_ids=ids)
            hook.remove()
            ann2snn.set_simulation(model, "fast")
        desired = seen["ann"]
    torch.testing.assert_close(error, desired - seen["y"])
    assert error.abs().max() > 0


def test_stdp_refuses_an_unknown_teacher(converted):
    snn, tokenizer, _, _ = converted
    with pytest.raises(ConfigError, match="teacher must be one of local, network"):
        finetune(_copy(snn), tokenizer, TRAIN, rule="stdp", steps=1, seq_len=SEQ, progress=False, teacher="oracle")


def test_resume_continues_from_the_checkpoint(converted, tmp_path, monkeypatch):
    snn, tokenizer, _, _ = converted
    options = dict(rule="distill", steps=4, seq_len=32, batch_size=2, checkpoint_every=2, progress=False,
                   train_weights=True)
    straight = _copy(snn)
    finetune(straight, tokenizer, TRAIN, **options)

    calls = {"n": 0}
    real_step = distill_module.Distill.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(distill_module.Distill, "step", interrupted)
    first = _copy(snn)
    with pytest.raises(KeyboardInterrupt):
        finetune(first, tokenizer, TRAIN, checkpoint_dir=tmp_path, **options)
    monkeypatch.setattr(distill_module.Distill, "step", real_step)

    resumed = _copy(snn)
    figures = finetune(resumed, tokenizer, TRAIN, checkpoint_dir=tmp_path, resume=True, **options)
    assert figures["resumed_from_step"] == 2
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    with pytest.raises(Exception, match="other settings"):
        finetune(_copy(snn), tokenizer, TRAIN, checkpoint_dir=tmp_path, resume=True, **{**options, "lr": 0.5})


# --- the holdout decides ---------------------------------------------------------------------------

def test_a_teacher_too_large_to_keep_is_recomputed_from_its_hidden_state_to_the_same_figures(converted, monkeypatch):
    """Above TEACHER_CACHE_BYTES (a large vocabulary) the holdout keeps the ANN's last hidden state and runs only its
    output layer again: the same KL and NLL as the kept log-probabilities, with the converted weights as teacher
    even after the SNN's weights moved."""
    snn, _, held_out, _ = converted
    model = _copy(snn)
    synaptic = synaptic_parameters(model)
    originals = {name: p.clone() for name, p in synaptic.items()}
    windows = held_out[:6]
    kept = holdout_module.Holdout(model, windows, originals)
    monkeypatch.setattr(holdout_module, "TEACHER_CACHE_BYTES", 0)
    recomputed = holdout_module.Holdout(model, windows, originals)
    assert kept.cached and not recomputed.cached
    assert recomputed.teacher[0].shape[-1] == model.config.hidden_size  # a hidden state, not a vocabulary's worth
    with torch.no_grad():
        for p in synaptic.values():
            p.mul_(1.05)  # the SNN moves; the teacher must not
    a, b = kept.evaluate(), recomputed.evaluate()
    assert torch.allclose(a.kl_windows, b.kl_windows, rtol=1e-5, atol=1e-7) and a.kl > 0
    assert torch.equal(a.nll_windows, b.nll_windows)
    assert torch.equal(kept.nll_ann_windows, recomputed.nll_ann_windows)


def test_the_decision_is_taken_on_text_the_training_never_saw(converted, tmp_path, monkeypatch):
    """Default: the last windows of the text; a file: that text. Neither is ever in a training batch, and the
    figures that decide (before and after) are the SNN's perplexity on exactly that text."""
    snn, tokenizer, _, _ = converted
    trained = []
    real_step = distill_module.Distill.step
    monkeypatch.setattr(distill_module.Distill, "step",
                        lambda self, ids, k, last=False: trained.append(ids.clone()) or real_step(self, ids, k, last))

    windows = token_windows(tokenizer, TRAIN, SEQ)
    model = _copy(snn)
    figures = finetune(model, tokenizer, TRAIN, steps=40, seq_len=SEQ, progress=False)
    seen = {tuple(row.tolist()) for batch in trained for row in batch}
    held = figures["held_out_windows"]
    assert held >= 4096 // (SEQ - 1) and figures["held_out_tokens"] + figures["selection_tokens"] >= 4096  # the minimum
    assert figures["train_windows"] + held == windows.shape[0]
    assert len(seen) > held  # training saw many windows ...
    assert not seen & {tuple(row.tolist()) for row in windows[-held:]}  # ... and none of the holdout's

    holdout = tmp_path / "holdout.txt"
    holdout.write_text(bundled_text("unseen.txt").read_text()[:30000])  # another author
    other = token_windows(tokenizer, read_texts(holdout), SEQ)
    trained.clear()
    model = _copy(snn)
    figures = finetune(model, tokenizer, TRAIN, steps=40, seq_len=SEQ, progress=False, holdout=holdout)
    assert figures["holdout"] == str(holdout) and figures["train_windows"] == windows.shape[0]
    assert figures["held_out_tokens"] + figures["selection_tokens"] == other[:, 1:].numel()
    assert not {tuple(row.tolist()) for batch in trained for row in batch} & {tuple(row.tolist()) for row in other}
    deciding = other[1::2]  # the odd windows decide; the even ones are distill's to stop early on
    assert figures["ppl_snn_before"] == pytest.approx(_snn_perplexity(snn, deciding), rel=1e-5)
    assert figures["ppl_snn_after"] == pytest.approx(_snn_perplexity(model, deciding), rel=1e-5)
    assert figures["ppl_snn_after"] < figures["ppl_snn_before"] and not figures["reverted"]


def test_a_fine_tune_that_does_not_help_on_the_holdout_is_undone(converted, monkeypatch):
    """A rule that lowers the training loss but damages the model elsewhere: the holdout catches it."""
    snn, tokenizer, _, _ = converted
    real_step = distill_module.Distill.step

    def damaging(self, ids, k, last=False):
        loss = real_step(self, ids, k, last)
        if last:
            with torch.no_grad():
                for p in self.neurons.parameters():
                    p.add_(torch.randn_like(p))  # thresholds scattered by e^±1
        return loss

    monkeypatch.setattr(distill_module.Distill, "step", damaging)
    model = _copy(snn)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    figures = finetune(model, tokenizer, TRAIN, steps=4, seq_len=SEQ, progress=False, eval_every=0)
    assert figures["reverted"] and figures["ppl_snn_after"] == figures["ppl_snn_before"]
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # byte-identical


def test_a_gain_that_most_held_out_windows_do_not_share_is_undone(converted, monkeypatch):
    """A mean beyond its noise from a few windows (3 of 10 gained) is not kept, and the reason is given."""
    snn, tokenizer, _, _ = converted
    monkeypatch.setattr(core, "improvement", lambda after, before: holdout_module.Difference(1.0, 0.1, 3, 10))
    model = _copy(snn)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    figures = finetune(model, tokenizer, TRAIN, steps=2, seq_len=SEQ, progress=False, eval_every=0)
    assert figures["reverted"] and figures["undone_because"].startswith("only 3 of the 10 held-out windows gained")
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("own_worse", [False, True])
def test_with_mix_a_gain_that_costs_the_users_own_windows_is_undone(converted, monkeypatch, own_worse):
    """The whole mixed holdout gains; kept unless the user's own windows lost beyond chance."""
    snn, tokenizer, _, _ = converted
    asked = []

    def fake(after, before, key="nll", windows=None):
        asked.append(windows)
        if windows is None:
            return holdout_module.Difference(1.0, 0.1, 10, 10)
        n = int(windows.sum())
        return holdout_module.Difference(-1.0 if own_worse else -0.01, 0.1, 0 if own_worse else n // 2, n)

    monkeypatch.setattr(core, "improvement", fake)
    figures = finetune(_copy(snn), tokenizer, TRAIN, steps=2, seq_len=SEQ, progress=False, eval_every=0, mix=0.25)
    own = asked[1]
    assert own is not None and 0 < int(own.sum()) < own.numel()  # the user's windows among the deciding half
    assert figures["reverted"] is own_worse
    assert (figures["undone_because"] or "").startswith("it made your own held-out windows worse") is own_worse
    assert figures["own_fall_nats"] == (-1.0 if own_worse else -0.01)


@pytest.mark.parametrize("guard_worse", [False, True])
def test_a_gain_that_costs_the_guard_text_is_undone(converted, monkeypatch, guard_worse):
    """The holdout gains; kept unless the guard text (another kind) lost beyond chance; guard=False asks nothing of it."""
    snn, tokenizer, _, _ = converted
    asked = []

    def fake(after, before, key="nll", windows=None):
        asked.append(before.nll_windows.numel())
        if len(asked) == 1:  # the deciding half of the holdout
            return holdout_module.Difference(1.0, 0.1, 10, 10)
        n = before.nll_windows.numel()
        return holdout_module.Difference(-1.0 if guard_worse else -0.01, 0.1, 0 if guard_worse else n // 2, n)

    monkeypatch.setattr(core, "improvement", fake)
    model = _copy(snn)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    figures = finetune(model, tokenizer, TRAIN, steps=2, seq_len=SEQ, progress=False, eval_every=0)
    probe = token_windows(tokenizer, read_texts(bundled_text("probe.txt")), holdout_module.GUARD_SEQ_LEN)
    assert asked[1] == len(probe) > 10  # the guard: the bundled probe text, in windows of 64 tokens
    assert figures["reverted"] is guard_worse
    assert (figures["undone_because"] or "").startswith("it made the guard text (another kind) worse") is guard_worse
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items()) is guard_worse
    assert figures["guard_fall_nats"] == (-1.0 if guard_worse else -0.01)

    asked.clear()
    figures = finetune(_copy(snn), tokenizer, TRAIN, steps=2, seq_len=SEQ, progress=False, eval_every=0, guard=False)
    assert len(asked) == 1 and figures["guard"] is None and figures["guard_fall_nats"] is None
    figures = finetune(_copy(snn), tokenizer, TRAIN, steps=2, seq_len=SEQ, progress=False, eval_every=0,
                       guard=[bundled_text("unseen.txt").read_text()[:6000]])
    assert figures["guard"] == "texts" and asked[-1] > 10
    with pytest.raises(ConfigError, match="guard must be a file"):
        finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, guard=3)
    with pytest.raises(ConfigError, match="fewer than 2 windows"):
        finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, guard=["too short"])


def test_a_gap_within_the_noise_leaves_the_snn_unchanged_unless_forced():
    """qwen2-tiny at T=10 is within noise of its ANN on the holdout: nothing to fine-tune."""
    ann, tokenizer = ann2snn.load_ann("qwen2-tiny")
    # uniform levels: per-site levels would spend part of T=10's margin on energy
    snn = ann2snn.convert(ann, tokenizer, timesteps=10, levels="uniform", calib_samples=8, seq_len=SEQ, progress=False)
    original = {k: v.clone() for k, v in snn.state_dict().items()}
    figures = finetune(snn, tokenizer, TRAIN, steps=20, seq_len=SEQ, progress=False)
    assert figures["skipped"] and "within its noise" in figures["skipped"], figures
    assert figures["gap_nats"] <= figures["gap_noise_nats"]
    worse, windows = figures["gap_windows_worse"]
    assert figures["gap_nats"] <= 0 or worse - windows / 2 <= 2 * windows ** 0.5 / 2  # nor most windows worse
    assert all(torch.equal(original[k], v) for k, v in snn.state_dict().items())  # byte-identical
    assert snn.ann2snn["finetune"]["skipped"] == figures["skipped"]  # recorded in the export
    forced = finetune(snn, tokenizer, TRAIN, steps=20, seq_len=SEQ, progress=False, force=True)
    assert not forced["skipped"] and forced["first_loss"] is not None  # trained (and kept or undone on the holdout)


def test_a_small_holdout_is_warned_about(converted):
    snn, tokenizer, _, _ = converted
    with pytest.warns(HoldoutWarning, match="fewer than the 4096"):
        figures = finetune(_copy(snn), tokenizer, [TRAIN[0][:12000]], steps=2, seq_len=SEQ, progress=False)
    assert figures["warnings"] and figures["held_out_tokens"] < 4096
    with pytest.raises(ConfigError, match="share"):
        finetune(_copy(snn), tokenizer, TRAIN, steps=1, seq_len=SEQ, holdout=1.5)


def test_bad_options_are_config_errors(converted):
    snn, tokenizer, _, _ = converted
    with pytest.raises(ConfigError, match="rule"):
        finetune(snn, tokenizer, TRAIN, rule="hebb", steps=1)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        finetune(snn, tokenizer, TRAIN, steps=1, resume=True)
    with pytest.raises(ConfigError, match="steps"):
        finetune(snn, tokenizer, TRAIN, steps=0)
    with pytest.raises(ConfigError, match="schedule"):
        finetune(snn, tokenizer, TRAIN, steps=1, schedule="linear")
    with pytest.raises(ConfigError, match="hidden"):
        finetune(snn, tokenizer, TRAIN, steps=1, hidden=-1.0)
    with pytest.raises(ConfigError, match="backoff must be a number above 1"):
        finetune(snn, tokenizer, TRAIN, steps=1, backoff=1.0)
    with pytest.raises(ConfigError, match="max_backoffs"):
        finetune(snn, tokenizer, TRAIN, steps=1, max_backoffs=-1)
    with pytest.raises(ConfigError, match="takes no option"):
        finetune(snn, tokenizer, TRAIN, steps=1, a_plus=1.0)


def test_cli_finetune_writes_a_loadable_export(converted, tmp_path):
    snn, tokenizer, _, _ = converted
    source = ann2snn.save(_copy(snn), tmp_path / "snn", tokenizer)
    data = tmp_path / "text.txt"
    data.write_text(TRAIN[0][:20000])
    out = tmp_path / "tuned"
    result = CliRunner().invoke(main, ["finetune", str(source), "--data", str(data), "--out", str(out), "--steps", "3",
                                       "--seq-len", "32", "--batch-size", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["rule"] == "distill" and figures["steps"] == 3
    model = ann2snn.load(out)
    assert model.ann2snn["finetune"]["rule"] == "distill"
    assert (out / "calibration.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no checkpoint or partial folder left
    original = dict(calibrated_neurons(ann2snn.load(source)))
    changed = any(not torch.equal(n.delta, original[name].delta) for name, n in calibrated_neurons(model))
    assert changed != figures["reverted"]  # the tuned thresholds were exported (unless the run undid itself)
    assert figures["train_weights"] is True  # the default: weights and thresholds
    only = CliRunner().invoke(main, ["finetune", str(source), "--data", str(data), "--out", str(tmp_path / "only"),
                                     "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--thresholds-only",
                                     "--json"], catch_exceptions=False)
    figures = json.loads(only.output.strip().splitlines()[-1])
    assert figures["train_weights"] is False and figures["mean_abs_dw"] == 0

    again = CliRunner().invoke(main, ["finetune", str(source), "--data", str(data), "--out", str(out)])
    assert again.exit_code == 2 and again.output.startswith("error: ") and len(again.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(main, ["finetune", str(source), "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


def test_cli_finetune_passes_rule_options_and_refuses_unknown_ones(converted, tmp_path):
    snn, tokenizer, _, _ = converted
    source = ann2snn.save(_copy(snn), tmp_path / "snn", tokenizer)
    data = tmp_path / "text.txt"
    data.write_text(TRAIN[0][:20000])
    common = ["finetune", str(source), "--data", str(data), "--rule", "stdp", "--steps", "1", "--seq-len", "32",
              "--batch-size", "2", "--json"]
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "a"), "--option", "teacher=network",
                                                "--option", "accumulate=1", "--mix", "0.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    options = figures["options"]
    assert options["teacher"] == "network" and options["accumulate"] == 1 and options["a_plus"] == 1.0  # the rest: defaults
    assert figures["mix"] == 0.2 and figures["mixed_windows"] > 0
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "b"), "--mix", "1.5"])
    assert result.exit_code == 2 and "--mix" in result.output and not (tmp_path / "b").exists()
    for option, message in (("teacher=oracle", "teacher must be one of local, network"),
                            ("bogus=1", "takes no option(s) bogus"), ("teacher", "is not KEY=VALUE")):
        result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "b"), "--option", option])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "b").exists()


def test_cli_finetune_takes_a_holdout_file_or_share_and_refuses_a_bad_one_before_loading(converted, tmp_path, monkeypatch):
    snn, tokenizer, _, _ = converted
    source = ann2snn.save(_copy(snn), tmp_path / "snn", tokenizer)
    data, holdout = tmp_path / "text.txt", tmp_path / "holdout.txt"
    data.write_text(TRAIN[0][:20000])
    holdout.write_text(bundled_text("unseen.txt").read_text()[:8000])
    common = ["finetune", str(source), "--data", str(data), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--json"]
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "a"), "--holdout", str(holdout)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["holdout"] == str(holdout) and figures["warnings"]  # 8000 characters are under 4096 tokens
    assert "note: the holdout has" in result.stderr
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "b"), "--holdout", "0.5"], catch_exceptions=False)
    assert json.loads(result.output.strip().splitlines()[-1])["holdout"].startswith("last ")

    monkeypatch.setattr(ann2snn, "load", lambda *a, **k: pytest.fail("the export was loaded before the options were checked"))
    for value in ("1.5", str(tmp_path / "missing.txt")):
        result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "c"), "--holdout", value])
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert not (tmp_path / "c").exists()
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "c"), "--guard", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "guard" in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_cli_finetune_takes_a_guard_file_or_none(converted, tmp_path):
    snn, tokenizer, _, _ = converted
    source = ann2snn.save(_copy(snn), tmp_path / "snn", tokenizer)
    data, guard = tmp_path / "text.txt", tmp_path / "guard.txt"
    data.write_text(TRAIN[0][:20000])
    guard.write_text(bundled_text("unseen.txt").read_text()[:8000])
    common = ["finetune", str(source), "--data", str(data), "--steps", "2", "--seq-len", "32", "--batch-size", "2"]
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "a"), "--guard", str(guard)], catch_exceptions=False)
    assert result.exit_code == 0 and f"guard ({guard}): NLL fell" in result.output, result.output
    result = CliRunner().invoke(main, common + ["--out", str(tmp_path / "b"), "--guard", "none", "--json"],
                                catch_exceptions=False)
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["guard"] is None and figures["guard_fall_nats"] is None


# --- `ann2snn convert ... --finetune` -----------------------------------------------------------------

def _convert(*args):
    return CliRunner().invoke(main, ["convert", *[str(a) for a in args]], catch_exceptions=False)


def test_convert_finetune_chains_the_fine_tune_before_export(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TRAIN[0][:20000])
    common = ["qwen2-tiny", "--calib-data", data, "--calib-samples", 2, "--seq-len", 32, "--timesteps", 3,
              "--coding", "phase", "--threshold", "max", "--outliers", "none"]
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    assert _convert(*common, "--out", plain).exit_code == 0
    result = _convert(*common, "--out", tuned, "--finetune", "--finetune-steps", 8)  # fewer can end worse (undone)
    assert result.exit_code == 0, result.output
    assert "fine-tuned (distill, 8 steps)" in result.output

    model = ann2snn.load(tuned)
    record = model.ann2snn["finetune"]
    assert record["rule"] == "distill" and record["steps"] == 8 and record["seq_len"] == 32
    assert record["data"] == str(data) and not record["reverted"]
    assert "finetune" not in ann2snn.load(plain).ann2snn
    config = json.loads((tuned / "snn_config.json").read_text())
    assert config["finetune"]["steps"] == 8  # recorded in the export itself
    original = dict(calibrated_neurons(ann2snn.load(plain)))
    assert any(not torch.equal(n.delta, original[name].delta) for name, n in calibrated_neurons(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # checkpoint and partial folders removed


@pytest.mark.parametrize("case", ["zero_steps", "steps_without_finetune", "missing_data", "unknown_rule", "baseline_recipe"])
def test_convert_finetune_bad_input_fails_before_loading_and_writes_nothing(case, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ann2snn, "load_ann", no_loading)
    out = tmp_path / "out"
    extra = {"zero_steps": ["--finetune", "--finetune-steps", 0],
             "steps_without_finetune": ["--finetune-steps", 5],
             "missing_data": ["--finetune", "--finetune-data", tmp_path / "nope.txt"],
             "unknown_rule": ["--finetune", "--finetune-rule", "hebb"],
             "baseline_recipe": ["--finetune", "--recipe", "braintransformers"]}[case]
    result = _convert("qwen2-tiny", "--out", out, *extra)
    assert result.exit_code == 2, result.output
    if case in ("zero_steps", "unknown_rule"):  # click's own check, as for --timesteps 0
        assert "Invalid value for '--finetune-" in result.output
    else:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_gap_rises_above_chance_by_its_mean_or_by_most_windows():
    """A heavy-tailed gap (a few windows far worse swamp the standard error) still counts when most windows are
    worse; a gap that is negative, or as often below zero as above, does not."""
    from ann2snn.finetune.holdout import Difference

    heavy = torch.cat([torch.full((28,), 0.05), torch.tensor([6.0, -5.0, 4.0, -4.5, 0.02])])  # 29 of 33 above zero
    found = Difference.of(heavy)
    assert found.mean <= found.noise and found.beyond_chance
    balanced = torch.tensor([0.3, -0.25] * 16)  # mean 0.025 within its noise (0.099), half the windows above zero
    assert not Difference.of(balanced).beyond_chance
    assert Difference.of(torch.full((8,), 0.5) + torch.arange(8) * 0.01).beyond_chance  # beyond its noise
    assert not Difference.of(-heavy).beyond_chance  # a fall is never a gain
    assert Difference.of(-heavy).worse_beyond_chance and not found.worse_beyond_chance
    assert not Difference.of(-balanced).worse_beyond_chance
    # a few windows gaining nats, most losing a little: a mean beyond its noise, yet most windows worse
    few = torch.cat([torch.full((140,), -0.02), torch.full((60,), 1.0)])
    lopsided = Difference.of(few)
    assert lopsided.mean > lopsided.noise and lopsided.beyond_chance
    assert not lopsided.helps_most_windows and lopsided.worse_beyond_chance
    assert found.helps_most_windows and not Difference.of(balanced).helps_most_windows
