"""The attention sink as constants: a fixed prefix whose keys and values the ANN computes once.

Pretrained LMs park attention on the first token of every sequence and give
that token *massive activations* (hundreds to thousands of times the typical
channel, above all at down_proj's input). A threshold that serves them wastes
every level on all other tokens; one that clips them breaks the sink. With
the ``"sink"`` outlier option the SNN never carries the sink as spikes:

- one sink token (the model's BOS, else its EOS id) is run through the float
  ANN once, at position −1, and each layer's post-RoPE key and value for it are
  kept as constants (`SpikingAttention.sink_key` / ``sink_value``);
- every query attends to them: its spikes select rows of the constant keys, and
  the sink's probability spikes select rows of the constant values, as a
  Synapsis's spikes select weight columns;
- the user's text keeps positions 0, 1, …: RoPE depends only on the distance
  between query and key, so the sink at position −1 acts as a prefix would,
  and no cache, position or generation code changes;
- calibration runs the ANN with the same constants attached, so thresholds
  are fitted to the prefixed network, whose first text token is an ordinary one.

The ANN the SNN is compared with (simulation ``"ann"``) stays the original
model without the prefix.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import ConfigError


def sink_token_ids(config) -> list[int]:
    """The one-token prefix: the model's BOS id, else its EOS id."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return [int(value)]
    raise ConfigError("the 'sink' outlier option needs a bos_token_id or eos_token_id in the model's config.json; drop 'sink' from --outliers")


MASSIVE_RATIO = 10.0  # first-token / other-token max at a down_proj input that marks an attention sink


@torch.no_grad()
def first_token_ratio(model, window: torch.Tensor) -> float:
    """Over decoder layers, the largest max|x| at down_proj's input on the first token / on the other tokens.

    `window` [L] is one calibration window. Real pretrained LMs show ratios in
    the hundreds (SmolLM2-135M: 280–500 on Austen windows); a model without an
    attention sink stays near 1 (the embedded qwen2-tiny: 0.3–0.6).
    """
    peaks = []

    def hook(_module, args):
        x = args[0].detach().abs()
        peaks.append((x[:, 0].amax() / x[:, 1:].amax().clamp_min(1e-12)).item())

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        model(input_ids=window[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return max(peaks)


def resolve_outliers(model, outliers: tuple[str, ...], window: torch.Tensor) -> tuple[tuple[str, ...], dict]:
    """Turn the "auto" outlier option into ("sink",) or () for this model; with a note for snn_config.json."""
    if outliers != ("auto",):
        return outliers, {}
    ratio = first_token_ratio(model, window)
    config = model.config
    has_id = any(getattr(config, name, None) is not None for name in ("bos_token_id", "eos_token_id"))
    chosen = ("sink",) if ratio >= MASSIVE_RATIO and has_id else ()
    return chosen, {"first_token_ratio": round(ratio, 2), "sink": "on" if chosen else
                    ("off: no bos_token_id or eos_token_id" if ratio >= MASSIVE_RATIO else "off: no massive first-token activations")}


@torch.no_grad()
def compute_sinks(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention module name, the float ANN's (key, value) of the sink prefix, each [kv_heads, P, head_dim].

    `model` must still be the ANN (before the module swap): it runs with sdpa attention.
    """
    ids = sink_token_ids(model.config)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(-len(ids), 0, device=device)[None]  # the prefix sits just before position 0
    previous = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        output = model.model(input_ids=input_ids, position_ids=positions, use_cache=True)
    finally:
        model.config._attn_implementation = previous
    cache = output["cache"] if "cache" in output else output["past_key_values"]  # renamed in transformers 5.x
    return {f"model.layers.{index}.self_attn": (layer.keys[0].clone(), layer.values[0].clone())
            for index, layer in enumerate(cache.layers)}


@contextmanager
def attached(model, sinks: dict | None):
    """Attach the sinks to the attention modules for calibration (read by the observing attention)."""
    modules = dict(model.named_modules())
    names = list(sinks or {})
    for name in names:
        modules[name].ann2snn_sink = sinks[name]
    try:
        yield
    finally:
        for name in names:
            del modules[name].ann2snn_sink


def prepend_sink(key, value, mask, sink_key, sink_value, query_length: int):
    """key/value [B, KVH, S, D] with the sink's [KVH, P, D] in front; mask [B, 1, Sq, S] (bool, True = attend) widened."""
    batch, kv_length = key.shape[0], key.shape[2]
    key = torch.cat([sink_key.to(key).expand(batch, -1, -1, -1), key], 2)
    value = torch.cat([sink_value.to(value).expand(batch, -1, -1, -1), value], 2)
    if mask is None:  # sdpa skipped the causal mask; make it explicit, aligned to the last keys
        mask = torch.ones(query_length, kv_length, dtype=torch.bool, device=key.device).tril(kv_length - query_length)[None, None]
    mask = mask[..., :kv_length]
    visible = torch.ones(*mask.shape[:-1], sink_key.shape[1], dtype=torch.bool, device=mask.device)
    return key, value, torch.cat([visible, mask], -1)
