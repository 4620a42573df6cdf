"""The central claim against an independent reference: the converted SNN, run spike by spike, equals the
original transformers model with every spiking operand rounded and clamped by hooks written here.

The reference uses nothing of ann2snn's modules or of `SpikeCode`: its rounding,
its level count L and its attention (eager, with the quantised exponentials and
their count-sum normaliser) are written below. It reads only the calibrated
steps Δ off the converted model, as data. Where the SNN quantises (see
ann2snn/modules/): the input of every Linear (q, k, v, o, gate, up, down and the
spiking lm_head), SiLU's input, q and k after RoPE and v for the two attention
products, and the unnormalised softmax exponentials (clip 1), which the second
product multiplies with the quantised v before dividing by their quantised sum.
"""

import pytest
import torch
from transformers import AttentionInterface, Qwen2ForCausalLM

import ann2snn
from ann2snn.modules.neuron import set_simulation

REFERENCE_ATTENTION = "test_quantised_eager"


def levels(coding: str, T: int) -> int:
    """L, the largest count: T for the rate code, 2^T − 1 for the phase code (T ≤ 23 here)."""
    return T if coding == "rate" else 2**T - 1


def rounded(x: torch.Tensor, delta: torch.Tensor, L: int) -> torch.Tensor:
    """x on the grid k·Δ: round half up, clamp to ±L."""
    return torch.clamp(torch.floor(x / delta + 0.5), -L, L) * delta


def quantised_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention on rounded q, k, v and rounded exponentials; query [B, H, S, D], key/value [B, KVH, S, D]."""
    deltas, L = module.reference_deltas, module.reference_levels
    q = rounded(query, deltas["q"][None, :, None, :], L)  # Δ per (head, head_dim) channel
    k = rounded(key, deltas["k"][None, :, None, :], L)
    v = rounded(value, deltas["v"][None, :, None, :], L)
    groups = query.shape[1] // key.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    s = scores.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=scores.device).tril()  # one unpadded sequence, no cache
    scores = scores.masked_fill(~causal, float("-inf"))
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    e = rounded(e, deltas["e"], L)
    out = torch.matmul(e, v) / e.sum(-1, keepdim=True)
    return out.transpose(1, 2), None


AttentionInterface.register(REFERENCE_ATTENTION, quantised_eager_attention)


def reference_model(folder, snn, coding: str, T: int):
    """The original checkpoint in float64 with rounding hooks at each operand the SNN spikes, at the SNN's Δ."""
    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    model.config._attn_implementation = REFERENCE_ATTENTION
    L = levels(coding, T)

    def round_input(delta):
        return lambda module, args: (rounded(args[0], delta, L),) + args[1:]

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_input(snn.get_submodule(name).neuron.delta.double()))
    for index, layer in enumerate(model.model.layers):
        converted = snn.model.layers[index]
        layer.mlp.act_fn.register_forward_pre_hook(round_input(converted.mlp.act_fn.neuron.delta.double()))
        spiking = converted.self_attn.snn
        layer.self_attn.reference_deltas = {"q": spiking.q_neuron.delta.double(), "k": spiking.k_neuron.delta.double(),
                                            "v": spiking.v_neuron.delta.double(), "e": spiking.softmax.neuron.delta.double()}
        layer.self_attn.reference_levels = L
    return model


@pytest.mark.parametrize("coding,T", [("rate", 12), ("phase", 5)])
def test_step_simulation_equals_an_independent_quantised_reference(qwen2_checkpoint, coding, T):
    model, tokenizer = ann2snn.load_ann(str(qwen2_checkpoint))
    # the reference holds one level count for every site: uniform levels
    snn = ann2snn.convert(model, tokenizer, coding=coding, timesteps=T, levels="uniform", calib_samples=4, seq_len=32,
                          progress=False)
    snn.double()
    reference = reference_model(qwen2_checkpoint, snn, coding, T)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :40]
    set_simulation(snn, "step")
    with torch.no_grad():
        spiking = snn(ids, use_cache=False).logits
        expected = reference(ids, use_cache=False).logits
        original = Qwen2ForCausalLM.from_pretrained(qwen2_checkpoint, dtype=torch.float64)(ids).logits
    torch.testing.assert_close(spiking, expected, rtol=0, atol=1e-9)
    # and the hooks matter: without them the reference is the float model, which the SNN is not
    assert (spiking - original).abs().max() > 1e-3
