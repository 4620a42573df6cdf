"""Layer-by-layer conversion: a checkpoint larger than memory, one decoder layer at a time.

`convert_layer_by_layer(folder, out, ...)` gives the export that
``ann2snn.save(ann2snn.convert(*load_ann(folder), ...), out)`` gives — the same
tensors, statistics and snn_config.json, the head's measured divergences to
rounding (tested) — while holding in memory only
the embedding, the final norm and head, **one decoder layer**, the calibration
hidden states between layers and the statistics gathered so far:

1. the model is built on the meta device (no memory); the embedding, norm and
   head are read from the checkpoint's safetensors, in the checkpoint's dtype;
2. the calibration windows go through the embedding, and the model's own
   forward prepares the arguments every decoder layer gets (positions, RoPE
   angles, causal mask); it is stopped at layer 0, whose inputs are kept;
3. for each layer: its weights are read, observers gather the statistics of its
   sites while the hidden states go through it (as the ANN — the next layer's
   input), the recipe's rules swap in its SNN modules, its tensors are written
   as one shard of the export, and the layer goes back to the meta device;
4. with a spiking head, its input neuron is calibrated on the final norm's
   output of the same hidden states, the head becomes a Synapsis, and its
   window is measured on those outputs (`calibration.head`); the
   embedding, norm and head become the last shard; config, statistics,
   tokenizer and snn_config.json (with every file's SHA-256) complete the folder.

The export folder is written atomically: an interruption leaves nothing.
With saved statistics (`calib_stats`) step 2 and the observing are skipped.

Outlier handling (rotate, smooth, sink, auto) rewrites or measures several
layers at once and is refused here, as are models whose decoder layers take
different masks (sliding-window layers mixed with full ones).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .calibration.calibrate import PROBE, WINDOWS, hand_over, load_statistics, observing, release_memory
from .calibration.data import calibration_windows, probe_windows
from .calibration.head import WINDOWS as HEAD_WINDOWS, fit_head
from .convert import calibration_summary, check_sites, export_metadata
from .errors import CheckpointError, ConfigError, NumericalError
from .export import check_output, unique_tensors, write_beside_weights, write_shard, write_shard_index
from .models import FINITE_CHUNK, check_seq_len, check_weight_files, load_tokenizer_from, parse_dtype, read_config, resolve_model
from .recipes import Recipe, check_supported, get_recipe
from .replace import CALIBRATION_ATTENTION, apply_recipe, matches, swap_modules


class _Stop(Exception):
    """Raised by the hook on layer 0 once the model has prepared its inputs."""


class CheckpointTensors:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read one by one."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            with safe_open(str(folder / "model.safetensors"), "pt") as handle:
                self.files = {name: folder / "model.safetensors" for name in handle.keys()}
        self.folder = folder

    def dtype(self, config) -> torch.dtype:
        """What dtype="auto" loads: config.json's dtype, else the checkpoint's (read from a small tensor)."""
        declared = getattr(config, "dtype", None)
        if isinstance(declared, torch.dtype):
            return declared
        if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
            return getattr(torch, declared)
        name = min((n for n in self.files if n.endswith("weight")), key=lambda n: ("norm" not in n, n))
        with safe_open(str(self.files[name]), "pt") as handle:
            return handle.get_tensor(name).dtype

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Materialise `module` (on the meta device) on the CPU with the checkpoint's tensors under `prefix`."""
        module.to_empty(device="cpu")
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"{prefix}.{name}"
            if key not in self.files:
                raise CheckpointError(f"the weights in {self.folder} lack {key}; the checkpoint is damaged")
            by_file.setdefault(self.files[key], []).append((key, tensor))
        with torch.no_grad():
            for file, entries in by_file.items():
                with safe_open(str(file), "pt") as handle:
                    for key, tensor in entries:
                        value = handle.get_tensor(key)
                        if value.shape != tensor.shape:
                            raise CheckpointError(f"the weights in {self.folder} do not match config.json (wrong shape {key}); "
                                                  "the checkpoint is damaged")
                        tensor.copy_(value)
                        if tensor.is_floating_point() and not all(torch.isfinite(c).all() for c in tensor.reshape(-1).split(FINITE_CHUNK)):
                            raise NumericalError(f"weight {key} holds NaN or Inf; the checkpoint is damaged")


def _skeleton(config, dtype: torch.dtype):
    """The model on the meta device, with RoPE's computed buffers made for real."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)  # inv_freq is computed, not stored: compute it
    return model.eval()


def _check(recipe: Recipe, config) -> None:
    if recipe.outliers:
        raise ConfigError("--layer-by-layer converts without outlier handling (rotate, smooth, sink and auto need "
                          "the whole model); drop --outliers or convert without --layer-by-layer")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ConfigError(f"this model mixes decoder layer types ({', '.join(sorted(set(layer_types)))}), which "
                          "--layer-by-layer does not handle; convert without it")


@torch.no_grad()
def _layer_inputs(model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch, (hidden states, keyword arguments) as the model's forward hands them to decoder layer 0."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0], kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model.model(input_ids=windows[start:start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()  # the hidden states carried between layers must not hold every earlier layer's graph
def convert_layer_by_layer(folder: str | Path, out: str | Path, tokenizer=None, *, recipe: str | Recipe = "qwen2",
                           timesteps: int | None = None, coding: str | None = None, threshold: str | None = None,
                           headroom: float | None = None, outliers: tuple[str, ...] | None = None,
                           range_steps: str | int | None = None, head_steps: str | int | None = None,
                           levels: str | None = None,
                           max_ppl_ratio: float | None = None, energy_budget: float | None = None,
                           calib_data: str | Path | None = None,
                           calib_samples: int = 32, seq_len: int = 128, calib_stats: str | Path | None = None,
                           seed: int = 0, dtype: torch.dtype | str | None = None,
                           overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True,
                           batch_size: int = 4) -> dict:
    """Convert the checkpoint `folder` to an export in `out`, one decoder layer in memory at a time.

    `folder` is what `ann2snn.load_ann` takes (a checkpoint folder, a hub id, a short name or 'qwen2-tiny');
    `tokenizer` defaults to the checkpoint's; `dtype` is a torch dtype or its name ("bfloat16", "auto").
    Options as `ann2snn.convert` (`outliers` must be empty); returns the export's
    metadata (what ``ann2snn.load(out).ann2snn`` holds, plus the statistics).
    With `calib_stats` (an export's calibration.safetensors, gathered without
    outlier handling) nothing runs: each layer is only read, converted and written.
    """
    folder, out = resolve_model(str(folder)), Path(out)
    read_config(folder, trust_remote_code)
    check_weight_files(folder)
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    recipe = recipe.with_options(timesteps=timesteps, coding=coding, threshold=threshold, headroom=headroom,
                                 outliers=outliers, range_steps=range_steps, head_steps=head_steps,
                                 level_allocation=levels, max_ppl_ratio=max_ppl_ratio,
                                 energy_budget=energy_budget)
    if max_ppl_ratio is not None or energy_budget is not None or levels == "auto":
        raise ConfigError("--layer-by-layer gives every site the same T (per-site levels are measured on the whole "
                          "model); drop --levels auto, --max-ppl-ratio and --energy-budget")
    recipe = recipe.with_uniform_levels()
    if calib_stats is not None and recipe.spiking_head and recipe.head_steps == "auto":
        warnings.warn("--layer-by-layer with --calib-stats runs no calibration windows through the model, so lm_head's "
                      f"input neuron gets T={recipe.timesteps}; drop --calib-stats for its own window")
        recipe = recipe.with_options(head_steps=0)
    check_output(out, overwrite)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer_from(folder, trust_remote_code)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    tensors = CheckpointTensors(folder)
    model = _skeleton(config, dtype or tensors.dtype(config))
    check_supported(recipe, getattr(model.config, "model_type", None))
    _check(recipe, model.config)
    if calib_stats is not None:
        statistics, saved = load_statistics(calib_stats)
        if saved.get("transforms"):
            raise CheckpointError(f"{calib_stats} was gathered with {', '.join(saved['transforms'])}, which "
                                  "--layer-by-layer does not apply; recalibrate (drop --calib-stats)")
        calibration = {"seed": seed, **saved, "reused_from": str(calib_stats)}
    else:
        statistics = {}
        check_seq_len(model.config, seq_len)
        windows = calibration_windows(tokenizer, calib_data, calib_samples, seq_len, seed)

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name in ("embed_tokens", "norm"):
        tensors.load_into(getattr(model.model, name), f"model.{name}")
    if tied:
        model.tie_weights()
    else:
        tensors.load_into(model.lm_head, "lm_head")

    layers = model.model.layers
    with atomic_folder(out, CheckpointError, overwrite) as tmp:
        if calib_stats is None:
            model.config._attn_implementation = CALIBRATION_ATTENTION  # the mask the calibration pass makes
            inputs = _layer_inputs(model, windows, batch_size)
        weight_map: dict[str, str] = {}
        shards = len(layers) + 1
        for index in tqdm(range(len(layers)), desc="converting layer by layer", unit="layer", disable=not progress):
            prefix = f"model.layers.{index}"
            tensors.load_into(layers[index], prefix)
            found = [m for m in matches(model, recipe) if m[0].startswith(prefix + ".")]
            if calib_stats is None:
                with observing(model, found, int(windows.numel()), seed=seed) as observers:
                    inputs = [(layers[index](hidden, **kwargs), kwargs) for hidden, kwargs in inputs]
                statistics.update(hand_over(observers))
            check_sites(found, statistics)
            apply_recipe(model, recipe, statistics, within=prefix)
            del found  # the replaced ANN modules: they still hold this layer's weights
            state = unique_tensors({f"{prefix}.{name}": t for name, t in layers[index].state_dict().items()})
            weight_map.update(write_shard(tmp, state, index + 1, shards))
            del state
            layers[index].to("meta")
            release_memory()
        outside = [m for m in matches(model, recipe) if not m[0].startswith("model.layers.")]
        site_timesteps, head = {}, None
        if outside:  # the spiking head: its input neuron is calibrated on the final norm's output, as in convert
            if calib_stats is None:
                with observing(model, outside, int(windows.numel()), seed=seed) as observers:
                    for hidden, _ in inputs:
                        model.lm_head(model.model.norm(hidden))
                statistics.update(hand_over(observers))
            check_sites(outside, statistics)
            for name, _, _ in outside:
                ctx = swap_modules(model, recipe, statistics, within=name)
                # its window from the final norm's output of the first calibration windows, as convert measures it
                head_inputs = None if calib_stats is not None else torch.cat(
                    [model.model.norm(hidden).flatten(0, -2) for hidden, _ in inputs])[:HEAD_WINDOWS * seq_len]
                timesteps, measured = fit_head(model, ctx, inputs=head_inputs)
                site_timesteps.update(timesteps)
                head = {**(head or {}), **(measured or {})} or None
        # a tied head (lm_head.weight, or lm_head.synapse.weight when it spikes) is written once, as the embedding
        rest = unique_tensors({name: t for name, t in model.state_dict().items() if not name.startswith("model.layers.")})
        weight_map.update(write_shard(tmp, rest, shards, shards))
        write_shard_index(tmp, weight_map)
        if calib_stats is None:
            # the windows too, so that a convert --calib-stats from this export can allocate per-site levels
            calibration = {**calibration_summary(calib_data, windows, seed, recipe.outliers), WINDOWS: windows,
                           PROBE: probe_windows(tokenizer, seq_len)}
        meta = export_metadata(recipe, calibration, statistics, site_timesteps, head=head)
        write_beside_weights(tmp, model.config, meta, tokenizer)
    return meta
