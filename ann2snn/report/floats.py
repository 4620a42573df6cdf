"""The operations that stay in floating point, in both models: counted from module shapes, by module type.

Each per-element cost is written once, in `FLOAT_COSTS`, and both the count and
the text in the report derive from it. Float matmuls that spikingjelly's
MACCounter sees (lm_head, any Linear left float) are MACs, not listed here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import (MistralAttention, MistralDecoderLayer, MistralMLP,
                                                          MistralRMSNorm)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP, Qwen2RMSNorm

from ..modules.attention import SpikingAttention
from ..modules.silu import SNNSiLU
from ..modules.staircase_silu import StaircaseSiLU

# The architectures the recipes convert (recipes/: qwen2, llama, mistral).
RMS_NORMS = (Qwen2RMSNorm, LlamaRMSNorm, MistralRMSNorm, nn.RMSNorm)
ATTENTIONS = (Qwen2Attention, LlamaAttention, MistralAttention)
GATED_MLPS = (Qwen2MLP, LlamaMLP, MistralMLP)
DECODER_LAYERS = (Qwen2DecoderLayer, LlamaDecoderLayer, MistralDecoderLayer)
SILUS = (SiLUActivation, nn.SiLU, SNNSiLU, StaircaseSiLU)

# FLOPs per unit: {kind: {unit: (FLOPs, which operations)}}.
FLOAT_COSTS = {
    "rmsnorm": {"element": (4, "square, sum, × rsqrt, × weight"), "row": (3, "mean, + eps, rsqrt")},
    "rope": {"element of q and k": (3, "× cos, × sin, add")},
    "attention scaling": {"visible score": (1, "× 1/sqrt(head_dim)")},
    "softmax": {"visible score": (4, "row max, subtract, exp, row-sum add"),
                "output element": (1, "divide by the row sum")},
    "silu": {"element": (4, "exp, add, divide, multiply")},
    "gate * up": {"intermediate element": (1, "multiply")},
    "residual additions": {"hidden element per decoder layer": (2, "two adds")},
    "spike encoding": {"neuron input": (1, "x / Δ, SNN only (and the integer ANN's quantiser, view ii)")},
    "embedding lookup": {"token": (0, "a memory read")},
}


def flops(kind: str, **units: int) -> int:
    """FLOPs of `kind` for the given amounts of its units (unit names with spaces as underscores)."""
    return sum(FLOAT_COSTS[kind][unit][0] * int(units[unit.replace(" ", "_")]) for unit in FLOAT_COSTS[kind])


def describe(kind: str) -> str:
    return " + ".join(f"{n} per {unit} ({ops})" for unit, (n, ops) in FLOAT_COSTS[kind].items())


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def visible_scores(mask: torch.Tensor | None, batch: int, heads: int, queries: int, keys: int) -> int:
    """Attention scores a causal kernel computes: the mask's visible entries (all without a mask), per head."""
    if mask is None:
        return batch * heads * queries * keys
    return int(torch.broadcast_to(mask, (batch, heads, queries, keys)).sum())


def causal_scores(batch: int, heads: int, length: int) -> int:
    return batch * heads * length * (length + 1) // 2


class FloatTally:
    """FLOPs of the operations that stay float, per decoder layer (None: outside the layers)."""

    def __init__(self):
        self.flops: dict[int | None, dict[str, int]] = {}

    def add(self, layer: int | None, kind: str, value: int) -> None:
        bucket = self.flops.setdefault(layer, {})
        bucket[kind] = bucket.get(kind, 0) + int(value)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for bucket in self.flops.values():
            for kind, value in bucket.items():
                out[kind] = out.get(kind, 0) + value
        return out

    def hooks(self, model: nn.Module) -> list:
        """Forward hooks counting every float operation of `model`; returns the handles."""
        handles = []
        for name, module in model.named_modules():
            layer = layer_of(name)
            hook = None
            if isinstance(module, RMS_NORMS):
                def hook(mod, args, out, layer=layer):
                    x = args[0]
                    self.add(layer, "rmsnorm", flops("rmsnorm", element=x.numel(), row=x.numel() // x.shape[-1]))
            elif isinstance(module, SpikingAttention):
                def hook(mod, args, out, layer=layer):
                    query, key, mask = args[0], args[1], args[3]
                    b, h, s, d = query.shape
                    scores = visible_scores(mask, b, h, s, key.shape[-2])
                    self.add(layer, "attention scaling", flops("attention scaling", visible_score=scores))
                    self.add(layer, "softmax", flops("softmax", visible_score=scores, output_element=b * h * s * d))
            elif isinstance(module, ATTENTIONS):
                handles.append(module.register_forward_hook(self._attention_hook(layer), with_kwargs=True))
            elif isinstance(module, SILUS):
                def hook(mod, args, out, layer=layer):
                    self.add(layer, "silu", flops("silu", element=args[0].numel()))
            elif isinstance(module, GATED_MLPS):
                def hook(mod, args, out, layer=layer):
                    rows = out.numel() // out.shape[-1]
                    self.add(layer, "gate * up", flops("gate * up", intermediate_element=rows * mod.intermediate_size))
            elif isinstance(module, DECODER_LAYERS):
                def hook(mod, args, out, layer=layer):
                    hidden = out[0] if isinstance(out, tuple) else out
                    self.add(layer, "residual additions",
                             flops("residual additions", hidden_element_per_decoder_layer=hidden.numel()))
            if hook is not None:
                handles.append(module.register_forward_hook(hook))
        return handles

    def _attention_hook(self, layer):
        """RoPE of every attention; for attention left float (the braintransformers baseline), its products too."""

        def hook(mod, args, kwargs, out):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            b, s = hidden.shape[:2]
            heads, kv_heads, dim = mod.config.num_attention_heads, mod.config.num_key_value_heads, mod.head_dim
            self.add(layer, "rope", flops("rope", element_of_q_and_k=b * s * dim * (heads + kv_heads)))
            if not hasattr(mod, "snn"):  # float sdpa escapes MACCounter: its causal products, counted here
                scores = causal_scores(b, heads, s)
                self.add(layer, "float attention matmuls (MAC)", 2 * scores * dim)
                self.add(layer, "attention scaling", flops("attention scaling", visible_score=scores))
                self.add(layer, "softmax", flops("softmax", visible_score=scores, output_element=b * heads * s * dim))

        return hook
