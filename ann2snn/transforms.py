"""Function-preserving rewrites of the ANN that make its activations easier to carry as spikes.

Real pretrained models have a few channels (and tokens) far larger than the
rest; one threshold per channel then wastes most levels. These rewrites change
the weights, not the network's function (tested: logits equal in float), and
run before the final calibration pass:

- `fold_norms`: RMSNorm scales g move into the Linears that read the norm's
  output (W ← W·diag(g)), leaving weight-free norms; needed by `rotate`.
- `rotate`: the residual stream is turned by a seeded orthogonal matrix Q
  (a randomised Hadamard matrix when the width is a power of two): readers
  W ← W·Q, writers W ← Qᵀ·W, embedding E ← E·Q. A weight-free RMSNorm commutes
  with Q. Each value head is turned too (v_proj rows and o_proj columns), which
  spreads outliers of v and of o_proj's input. Everything folds into weights.
- `smooth`: SmoothQuant's migration s_j = max|x_j|^α / max|W_j|^(1−α): a
  Synapsis input channel j is divided by s_j where it is produced (the norm
  scale, up_proj's rows, v_proj's rows) and its weight column multiplied by s_j.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

TRANSFORMS = ("rotate", "smooth")
OUTLIER_OPTIONS = TRANSFORMS + ("sink",)  # "sink" is no weight rewrite: see ann2snn.attention_sink


def _layers(model):
    return model.model.layers


@torch.no_grad()
def fold_norms(model) -> None:
    def fold(norm, linears):
        g = norm.weight.float()
        for linear in linears:
            linear.weight.copy_((linear.weight.float() * g.to(linear.weight.device)).to(linear.weight.dtype))
        norm.weight.fill_(1.0)

    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _untie_lm_head(model)
    fold(model.model.norm, [model.lm_head])


def _untie_lm_head(model) -> None:
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def orthogonal(size: int, seed: int) -> torch.Tensor:
    """A seeded orthogonal matrix: randomised Hadamard for powers of two, else QR of a Gaussian."""
    generator = torch.Generator().manual_seed(seed)
    if size & (size - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (size,), generator=generator).double() * 2 - 1
        return (h * signs) / math.sqrt(size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _mul(linear: nn.Linear, right: torch.Tensor | None = None, left: torch.Tensor | None = None) -> None:
    """W ← left·W·right (and the bias b ← b·leftᵀ), in float64 then back."""
    w = linear.weight.double()
    if right is not None:
        w = w @ right.to(w.device)  # the layer's device: a placed model's layers sit on several
    if left is not None:
        left = left.to(w.device)
        w = left @ w
        if linear.bias is not None:
            linear.bias.copy_((left @ linear.bias.double()).to(linear.bias.dtype))
    linear.weight.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def rotate(model, seed: int = 0) -> None:
    """Rotate the residual stream and every value head by seeded orthogonal matrices (folds norms first)."""
    fold_norms(model)
    config = model.config
    q = orthogonal(config.hidden_size, seed)
    embed = model.model.embed_tokens
    embed.weight.copy_((embed.weight.double() @ q.to(embed.weight.device)).to(embed.weight.dtype))
    head_dim = _layers(model)[0].self_attn.head_dim
    groups = config.num_attention_heads // config.num_key_value_heads
    for index, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _mul(reader, right=q)
        for writer in (attn.o_proj, mlp.down_proj):
            _mul(writer, left=q.t())
        # value heads: v_h ← v_h·R, so o_proj's input head h turns by R too
        r = orthogonal(head_dim, seed + 1 + index)
        _mul(attn.v_proj, left=torch.block_diag(*[r.t()] * config.num_key_value_heads))
        _mul(attn.o_proj, right=torch.block_diag(*[r] * (config.num_key_value_heads * groups)))
    _mul(model.lm_head, right=q)


def _divide(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.copy_((norm.weight.double() / s.to(norm.weight.device)).to(norm.weight.dtype))


@torch.no_grad()
def smooth(model, statistics: dict, alpha: float = 0.5) -> None:
    """SmoothQuant-style migration at every Synapsis input, from calibration maxima of the current model."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads

    def scales(site: str, consumers: list[nn.Linear]) -> torch.Tensor:
        x = statistics[site]["absmax"].double().clamp_min(1e-5)
        w = torch.stack([c.weight.double().abs().amax(0).cpu() for c in consumers]).amax(0).clamp_min(1e-5)
        return (x.pow(alpha) / w.pow(1 - alpha)).clamp(1e-2, 1e2)  # on the CPU, as the statistics

    def scale_columns(linears, s):
        for linear in linears:
            linear.weight.copy_((linear.weight.double() * s.to(linear.weight.device)).to(linear.weight.dtype))

    for index, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}"
        s = scales(f"{prefix}.self_attn.q_proj", [attn.q_proj, attn.k_proj, attn.v_proj])
        _divide(layer.input_layernorm, s)
        scale_columns([attn.q_proj, attn.k_proj, attn.v_proj], s)
        s = scales(f"{prefix}.mlp.gate_proj", [mlp.gate_proj, mlp.up_proj])
        norm = layer.post_attention_layernorm
        _divide(norm, s)
        scale_columns([mlp.gate_proj, mlp.up_proj], s)
        s = scales(f"{prefix}.mlp.down_proj", [mlp.down_proj])
        _mul(mlp.up_proj, left=torch.diag(1 / s))
        scale_columns([mlp.down_proj], s)
        # o_proj's input channel (head h, d) comes from value channel (h // groups, d): one scale per value channel
        s = scales(f"{prefix}.self_attn.o_proj", [attn.o_proj])
        s = s.reshape(config.num_key_value_heads, groups, -1).amax(1).reshape(-1)
        _mul(attn.v_proj, left=torch.diag(1 / s))
        scale_columns([attn.o_proj], s.reshape(config.num_key_value_heads, 1, -1).expand(-1, groups, -1).reshape(-1))


def check_transforms(names) -> tuple[str, ...]:
    """Validate an outlier-handling list: TRANSFORMS and "sink", or "auto" alone."""
    names = tuple(names or ())
    if "auto" in names and names != ("auto",):
        raise ConfigError("outlier option 'auto' (attention sink where the model needs one) stands alone; list the options instead")
    unknown = [n for n in names if n not in OUTLIER_OPTIONS + ("auto",)]
    if unknown:
        raise ConfigError(f"unknown outlier option(s) {', '.join(unknown)}; choose from auto, none, {', '.join(OUTLIER_OPTIONS)}")
    return names
