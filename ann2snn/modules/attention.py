"""Spiking attention: SNNMatmul for both products, SNNSoftmax between them.

Per head, with q and k after RoPE and v as the Linear layers produce them:

    scores = SNNMatmul(spikes(q), spikes(k))·scaling          (QKᵀ)
    e      = exp(scores − rowmax), masked positions → 0        (float)
    out    = SNNMatmul(spikes(e), spikes(v)) / Σ_j count(e_j)·Δ_e

SNNSoftmax encodes the *unnormalised* exponentials e ∈ (0, 1] with a fixed
step (clip 1: the row's largest entry is exactly 1), so it needs no
calibration and each row of the spiking probabilities sums to 1 to float
precision: the normaliser is the accumulated spike count of the same train.
Masked positions give e = 0 and never fire, and never enter the row maximum.

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
    select which accumulated rows to add or subtract.
    """
    if not isinstance(a, SpikeTrain) and not isinstance(b, SpikeTrain):
        return torch.matmul(a, b)
    if not (isinstance(a, SpikeTrain) and isinstance(b, SpikeTrain)):
        raise TypeError("snn_matmul needs two spike trains or two dense tensors")
    a_t, b_t = a.values(), b.values()
    a_upto = a_t.cumsum(0)
    b_before = b_t.cumsum(0) - b_t
    return (torch.matmul(a_upto, b_t) + torch.matmul(a_t, b_before)).sum(0)


class SNNMatmul(nn.Module):
    """Module form of `snn_matmul`, so calls can be hooked and counted."""

    def forward(self, a, b):
        return snn_matmul(a, b)


class SNNSoftmax(nn.Module):
    """Softmax whose output is a spike train of unnormalised exponentials and its row sums."""

    def __init__(self, code: SpikeCode):
        super().__init__()
        self.neuron = SignedNeuron(code, (), torch.tensor(code.step_size(torch.tensor(1.0)).item()))

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None):
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(scores - row_max)  # the exponential stays in float (listed in snn_config.json)
        train = self.neuron(e)
        accumulated = train.accumulate() if isinstance(train, SpikeTrain) else train
        row_sum = accumulated.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        return train, row_sum


class SpikingAttention(nn.Module):
    """Spike-driven grouped-query attention for one decoder layer."""

    def __init__(self, code: SpikeCode, heads: int, kv_heads: int, head_dim: int,
                 q_step: torch.Tensor | None = None, k_step: torch.Tensor | None = None, v_step: torch.Tensor | None = None):
        super().__init__()
        self.groups = heads // kv_heads
        self.q_neuron = SignedNeuron(code, (heads, head_dim), q_step)
        self.k_neuron = SignedNeuron(code, (kv_heads, head_dim), k_step)
        self.v_neuron = SignedNeuron(code, (kv_heads, head_dim), v_step)
        self.qk = SNNMatmul()
        self.softmax = SNNSoftmax(code)
        self.pv = SNNMatmul()

    def forward(self, query, key, value, mask, scaling: float) -> torch.Tensor:
        """query [B, H, S, D], key/value [B, KVH, S_kv, D] → output [B, S, H, D]."""
        # Neurons see channels last: [B, S, heads, head_dim].
        q = self.q_neuron(query.transpose(1, 2))
        k = self.k_neuron(key.transpose(1, 2))
        v = self.v_neuron(value.transpose(1, 2))
        q = _apply(q, lambda x: x.transpose(-3, -2))
        k = _apply(k, lambda x: x.transpose(-3, -2).repeat_interleave(self.groups, dim=-3).transpose(-1, -2))
        v = _apply(v, lambda x: x.transpose(-3, -2).repeat_interleave(self.groups, dim=-3))
        scores = self.qk(q, k) * scaling
        probs, row_sum = self.softmax(scores, mask)
        v = _apply(v, lambda x: x.to(row_sum.dtype))
        out = self.pv(probs, v) / row_sum
        return out.transpose(1, 2).to(query.dtype)


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
