"""Spiking attention: SNNMatmul for both products, SNNSoftmax between them.

Per head, with q and k after RoPE and v as the Linear layers produce them:

    scores = SNNMatmul(spikes(q), spikes(k))·scaling          (QKᵀ)
    e      = exp(scores − rowmax), masked positions → 0        (float)
    out    = SNNMatmul(counts(e), counts(v))·Δ_v / Σ_j count(e_j)

SNNSoftmax encodes the *unnormalised* exponentials e ∈ (0, 1] with a fixed
step (clip 1: the row's largest entry is exactly 1), so it needs no
calibration and each row of the spiking probabilities sums to 1: the
normaliser is the spike count of the same train. Masked positions give e = 0
and never fire, and never enter the row maximum.

P·V runs on the two trains in units of their steps (integer counts; float64
keeps every partial sum exact) and is scaled by Δ_v once at the end, in fast
and in step simulation alike. So both produce the same bits, also where an
output lands exactly on the next neuron's rounding boundary — which is common,
not rare: a query attending to one token sends that token's quantised v
unchanged, a multiple of Δ_v, onto o_proj's grid. Rounded in a different order,
fast and step would round such ties apart.

The module is reached through `transformers`' AttentionInterface under the
name ``"ann2snn"`` (with a matching AttentionMaskInterface entry giving a
boolean causal mask); `SpikingAttention` lives on each attention module as
``self_attn.snn``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..coding import SpikeCode
from .neuron import SignedNeuron, SpikeTrain

ATTENTION_NAME = "ann2snn"


def snn_matmul(a: torch.Tensor | SpikeTrain, b: torch.Tensor | SpikeTrain) -> torch.Tensor:
    """Product a @ b of two spike trains accumulated over their window.

    Dense inputs (fast and ann simulation) multiply directly. For spike trains
    the product of the running sums telescopes: with A_≤t the accumulated a up to
    step t and B_<t the accumulated b before it,

        Σ_t (A_≤t @ b_t + a_t @ B_<t) = A_T @ B_T,

    so every term pairs an accumulated value with one step's spikes: the spikes
    select which accumulated rows to add or subtract. The loop runs over the T
    steps only: A_≤t and B_<t are two running buffers, and both terms of a step
    accumulate in place into the output (no [T, …] stack of products).

    Grouped-query attention without copies: when a has g times as many heads
    (dim −3) as b, each group of g consecutive heads of a shares one head of b
    (as `repeat_interleave(g, dim=-3)` of b would give), by a reshape of a.
    """
    if not isinstance(a, SpikeTrain) and not isinstance(b, SpikeTrain):
        groups = head_groups(a.shape, b.shape)
        if groups == 1:
            return torch.matmul(a, b)
        return ungroup_heads(torch.matmul(group_heads(a, groups), b), groups)
    if not (isinstance(a, SpikeTrain) and isinstance(b, SpikeTrain)):
        raise TypeError("snn_matmul needs two spike trains or two dense tensors")
    steps = max(a.timesteps, b.timesteps)  # a site with range steps has a longer window (coding.py)
    a, b = a.widened(steps), b.widened(steps)
    a_t, b_t = a.values(), b.values()
    groups = head_groups(a_t.shape[1:], b_t.shape[1:])
    if groups > 1:
        a_t = group_heads(a_t, groups)
    batch = torch.broadcast_shapes(a_t.shape[1:-2], b_t.shape[1:-2])
    m, k, n = a_t.shape[-2], a_t.shape[-1], b_t.shape[-1]
    dtype = torch.promote_types(a_t.dtype, b_t.dtype)
    # [T, batch, m, k] and [T, batch, k, n] flattened to 3-d batches, for baddbmm
    a_t = a_t.to(dtype).expand(a_t.shape[:1] + batch + (m, k)).reshape(a_t.shape[0], -1, m, k)
    b_t = b_t.to(dtype).expand(b_t.shape[:1] + batch + (k, n)).reshape(b_t.shape[0], -1, k, n)
    a_upto = a_t[0].clone()
    b_before = b_t[0].clone()
    out = torch.bmm(a_upto, b_t[0])  # step 0: A_≤0 @ b_0 (B_<0 = 0)
    for t in range(1, a_t.shape[0]):
        a_upto.add_(a_t[t])
        out.baddbmm_(a_upto, b_t[t]).baddbmm_(a_t[t], b_before)
        if t + 1 < a_t.shape[0]:
            b_before.add_(b_t[t])
    out = out.reshape(batch + (m, n))
    return ungroup_heads(out, groups) if groups > 1 else out


def head_groups(a_shape, b_shape) -> int:
    """g when a's dim −3 (heads) is g > 1 times b's and the other batch dims agree; else 1."""
    if len(a_shape) < 3 or len(a_shape) != len(b_shape) or a_shape[:-3] != b_shape[:-3]:
        return 1
    heads, kv_heads = a_shape[-3], b_shape[-3]
    return heads // kv_heads if heads != kv_heads and kv_heads > 0 and heads % kv_heads == 0 else 1


def group_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., H, m, k] → [..., H/g, g·m, k]: the g heads sharing one key/value head, stacked along rows."""
    return x.reshape(x.shape[:-3] + (x.shape[-3] // groups, groups * x.shape[-2], x.shape[-1]))


def ungroup_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(x.shape[:-3] + (x.shape[-3] * groups, x.shape[-2] // groups, x.shape[-1]))


class SNNMatmul(nn.Module):
    """Module form of `snn_matmul`, so calls can be hooked and counted."""

    def forward(self, a, b):
        return snn_matmul(a, b)


class SNNSoftmax(nn.Module):
    """Softmax whose output is a spike train of unnormalised exponentials (normalised by `SpikingAttention`)."""

    def __init__(self, code: SpikeCode):
        super().__init__()
        self.neuron = SignedNeuron(code, (), torch.tensor(code.delta_for(torch.tensor(1.0)).item()))

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None):
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(scores - row_max)  # the exponential stays in float (listed in snn_config.json)
        return self.neuron(e)


class SpikingAttention(nn.Module):
    """Spike-driven grouped-query attention for one decoder layer.

    With `sink_tokens` > 0 every query also attends to constant sink keys and
    values (`ann2snn.attention_sink`): the query's spikes select rows of the
    constant keys and the sink probability's spikes rows of the constant values,
    as spikes select a Synapsis's weight columns. In ``"ann"`` simulation the
    sink is left out, so the ANN stays the original model.
    """

    def __init__(self, code: SpikeCode, heads: int, kv_heads: int, head_dim: int,
                 q_step: torch.Tensor | None = None, k_step: torch.Tensor | None = None, v_step: torch.Tensor | None = None,
                 sink: tuple[torch.Tensor, torch.Tensor] | None = None, sink_tokens: int = 0,
                 qkv_codes: tuple[SpikeCode, SpikeCode, SpikeCode] | None = None):
        super().__init__()
        self.groups = heads // kv_heads
        q_code, k_code, v_code = qkv_codes or (code,) * 3  # each with its own range steps; the softmax keeps `code`
        self.q_neuron = SignedNeuron(q_code, (heads, head_dim), q_step)
        self.k_neuron = SignedNeuron(k_code, (kv_heads, head_dim), k_step)
        self.v_neuron = SignedNeuron(v_code, (kv_heads, head_dim), v_step)
        self.qk = SNNMatmul()
        self.softmax = SNNSoftmax(code)
        self.pv = SNNMatmul()
        self.sink_tokens = sink_tokens
        if sink_tokens:
            key, value = sink if sink is not None else (torch.zeros(kv_heads, sink_tokens, head_dim),) * 2
            self.register_buffer("sink_key", key.detach().clone())
            self.register_buffer("sink_value", value.detach().clone())
        self.simulation = "fast"

    def forward(self, query, key, value, mask, scaling: float) -> torch.Tensor:
        """query [B, H, S, D], key/value [B, KVH, S_kv, D] → output [B, S, H, D]."""
        # Neurons see channels last: [B, S, heads, head_dim].
        q = self.q_neuron(query.transpose(1, 2))
        k = self.k_neuron(key.transpose(1, 2))
        v = self.v_neuron(value.transpose(1, 2))
        # k and v keep their kv_heads: snn_matmul shares each among its group of query heads (no copies)
        q = _apply(q, lambda x: x.transpose(-3, -2))
        k = _apply(k, lambda x: x.transpose(-3, -2).transpose(-1, -2))
        v = _apply(v, lambda x: x.transpose(-3, -2))
        scores = self.qk(q, k) * scaling
        sink = self.sink_tokens and self.simulation != "ann"
        if sink:
            sink_key = self.sink_key.repeat_interleave(self.groups, 0).transpose(-1, -2).to(scores.dtype)
            scores = torch.cat([_constant_matmul(q, sink_key) * scaling, scores], -1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], self.sink_tokens), mask], -1)
        probs = self.softmax(scores, mask)
        if self.softmax.neuron.simulation != "ann" and self.v_neuron.simulation != "ann":
            # quantised: the product in units of the neurons' steps (module docstring), then Δ_v per channel
            v_delta = self._head_delta(self.v_neuron, value.transpose(1, 2))
            probs = _in_units(probs, self.softmax.neuron.current_delta(scores))
            v = _in_units(v, v_delta)
            v_delta = v_delta.repeat_interleave(self.groups, dim=-3) if self.groups > 1 else v_delta
        else:  # the float attention of the original model (or a test's, with the neurons off)
            v_delta = None
            probs = probs.to(torch.promote_types(probs.dtype, v.dtype))
            v = v.to(probs.dtype)
        row_sum = _accumulated(probs).sum(-1, keepdim=True)  # sink included
        row_sum = row_sum.clamp_min(torch.finfo(row_sum.dtype).tiny)  # a fully masked row has none
        if sink:
            sink_probs = _apply(probs, lambda x: x[..., : self.sink_tokens])
            probs = _apply(probs, lambda x: x[..., self.sink_tokens:])
        out = self.pv(probs, v)
        if v_delta is not None:
            out = out * v_delta
        if sink:  # the sink probability's spikes select rows of the constant values
            sink_value = self.sink_value.repeat_interleave(self.groups, 0).to(out.dtype)
            out = out + _constant_matmul(sink_probs, sink_value)
        return (out / row_sum).transpose(1, 2).to(query.dtype)

    @staticmethod
    def _head_delta(neuron: SignedNeuron, x: torch.Tensor) -> torch.Tensor:
        """The neuron's step for x [B, S, heads, head_dim], shaped to broadcast over [B, heads, S, head_dim]."""
        delta = neuron.current_delta(x).to(torch.float64)
        return delta.unsqueeze(-2) if delta.dim() == 2 else delta


def _constant_matmul(x: torch.Tensor | SpikeTrain, constant: torch.Tensor) -> torch.Tensor:
    """x @ constant where x may be a spike train: each step's spikes select ± rows of the constant."""
    if isinstance(x, SpikeTrain):
        return torch.matmul(x.values(), constant.to(x.spikes.dtype)).sum(0)
    return torch.matmul(x, constant.to(x.dtype))


def _in_units(x: torch.Tensor | SpikeTrain, delta: torch.Tensor) -> torch.Tensor | SpikeTrain:
    """x in units of its step Δ, in float64: a train with Δ = 1, or the integer counts of a quantised value.

    A quantised x is k·Δ, so x/Δ is k to within an ulp and rounds to it; the rounding is passed straight
    through (u + (k − u), exactly k: k − u is exact for u this close to k), so fine-tuning's gradients
    reach x and Δ as through x itself."""
    if isinstance(x, SpikeTrain):
        return SpikeTrain(x.spikes.to(torch.float64), x.weights, torch.ones((), dtype=torch.float64, device=x.spikes.device))
    u = x.to(torch.float64) / delta.to(device=x.device, dtype=torch.float64)
    return u + (torch.round(u) - u).detach()


def _accumulated(x: torch.Tensor | SpikeTrain) -> torch.Tensor:
    return x.accumulate() if isinstance(x, SpikeTrain) else x


def _apply(x, fn):
    return x.map(fn) if isinstance(x, SpikeTrain) else fn(x)


def snn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: route to the layer's SpikingAttention."""
    snn = getattr(module, "snn", None)
    if snn is None:
        raise RuntimeError(f"{type(module).__name__} has no SpikingAttention; convert the model with ann2snn first")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask → True where attended
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    return snn(query, key, value, attention_mask, module.scaling if scaling is None else scaling), None


def snn_attention_mask(*args, **kwargs):
    """Always a boolean mask (True = attend): SNNSoftmax must know every masked position."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, snn_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, snn_attention_mask)
