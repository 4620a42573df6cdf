"""Export and reload of a converted SNN.

An export folder holds:
- `config.json` — the original model's configuration;
- `snn_config.json` — format version, recipe (coding, T, threshold rule,
  rules), which operations stay in floating point, calibration summary,
  package versions, and the SHA-256 of every other file;
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with an
  index) — weights and every neuron's step Δ;
- `calibration.safetensors` — the statistics, reusable by `--calib-stats`;
- the tokenizer files.

Writing is atomic: everything goes to a hidden sibling folder that is renamed
into place only when complete, so an interrupted or failed export leaves no
half-written folder. Loading verifies every hash and refuses a tampered export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_folder
from .errors import CheckpointError, ConfigError
from .placement import place
from .replace import apply_recipe

FORMAT_VERSION = 2  # 2: a neuron's quantisation step Δ is stored as `delta` (format 1: `step`)
SNN_CONFIG = "snn_config.json"
CALIBRATION_FILE = "calibration.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def _write_weights(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        weight_map.update(write_shard(folder, shard, i, len(shards)))
    write_shard_index(folder, weight_map)


def write_shard(folder: Path, tensors: dict[str, torch.Tensor], index: int, count: int) -> dict[str, str]:
    """Write shard `index` of `count` (counted from 1); returns {tensor name: file name} for the index."""
    file = f"model-{index:05d}-of-{count:05d}.safetensors"
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    return {name: file for name in tensors}


def write_shard_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2, sort_keys=True))


def save(model, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the converted `model` (from `ann2snn.convert`) to `out_dir`, atomically."""
    meta = getattr(model, "ann2snn", None)
    if meta is None:
        raise ConfigError("this model was not converted by ann2snn; call ann2snn.convert first")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    with atomic_folder(out, CheckpointError, overwrite) as tmp:
        _write_weights(_unique_state(model), tmp, shard_bytes)
        write_beside_weights(tmp, model.config, meta, tokenizer)
    return out


def write_beside_weights(folder: Path, config, meta: dict, tokenizer=None) -> None:
    """The rest of an export, once its weights are in `folder`: config, statistics, tokenizer, and
    snn_config.json with the SHA-256 of every file (written last)."""
    config.save_pretrained(folder)
    if meta.get("statistics") is not None:
        from .calibration.calibrate import save_statistics

        save_statistics(meta["statistics"], folder / CALIBRATION_FILE, meta["calibration"])
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    files = {p.name: sha256(p) for p in sorted(folder.iterdir())}
    snn_config = {key: value for key, value in meta.items() if key != "statistics"}
    snn_config.update({"format_version": FORMAT_VERSION, "ann2snn_version": __version__, "files": files})
    (folder / SNN_CONFIG).write_text(json.dumps(snn_config, indent=2, sort_keys=True) + "\n")


def read_snn_config(folder: Path) -> dict:
    path = folder / SNN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {SNN_CONFIG}; it is not an ann2snn export (convert the model first)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the export is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("format_version"), int) or not isinstance(config.get("files"), dict):
        raise CheckpointError(f"{path} lacks format_version or files; the export is damaged")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was written by a newer ann2snn (format {config['format_version']}, this one reads {FORMAT_VERSION}); upgrade ann2snn"
        )
    recipe = config.get("recipe")
    expected = {"name": str, "coding": str, "timesteps": int, "threshold": str, "outliers": list}
    if not isinstance(recipe, dict) or any(not isinstance(recipe.get(k), t) or isinstance(recipe.get(k), bool)
                                           for k, t in expected.items()):
        raise CheckpointError(f"{path} has no valid recipe (name, coding, timesteps, threshold, outliers); the export is damaged")
    if not all(isinstance(o, str) for o in recipe["outliers"]):
        raise CheckpointError(f"{path} lists outlier transforms that are not names; the export is damaged")
    if not all(isinstance(v, str) and isinstance(k, str) and "\x00" not in k for k, v in config["files"].items()):
        raise CheckpointError(f"{path} lists files wrongly; the export is damaged")
    return config


def verify(folder: Path, config: dict) -> None:
    for name, expected in config["files"].items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{folder} lacks {name} that {SNN_CONFIG} lists; the export is incomplete")
        if sha256(path) != expected:
            raise CheckpointError(f"{path} does not match the SHA-256 in {SNN_CONFIG}; the export was modified or damaged")


def _read_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    files = sorted(n for n in config["files"] if n.startswith("model") and n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no model weights; the export is incomplete")
    state = {}
    try:
        for name in files:
            with safe_open(str(folder / name), "pt") as handle:
                state.update({key: handle.get_tensor(key) for key in handle.keys()})
    except (SafetensorsError, OSError) as exc:
        raise CheckpointError(f"cannot read the weights in {folder} ({exc}); the export is damaged") from None
    if config["format_version"] < 2:
        # format 1 called every neuron's Δ buffer `step`; no other weight of a causal LM ends in ".step"
        state = {key[: -len("step")] + "delta" if key.endswith(".step") else key: value for key, value in state.items()}
    return state


def load(folder: str | Path, dtype: torch.dtype | None = None, device_map: str | None = None):
    """Load an exported SNN: a transformers causal LM with ann2snn's SNN modules, verified and in eval mode.

    `device_map`: None / "cpu", a device ("cuda:0") or "auto" (spread over the GPUs; `ann2snn.placement`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .recipes import get_recipe

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; pass the --out folder of ann2snn convert")
    config = read_snn_config(folder)
    verify(folder, config)
    options = config["recipe"]
    recipe = get_recipe(options.get("name")).with_options(
        coding=options.get("coding"), timesteps=options.get("timesteps"), threshold=options.get("threshold"),
        headroom=options.get("headroom"), outliers=tuple(options.get("outliers") or ()),
        range_steps=options.get("range_steps", 0))
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype or getattr(model_config, "dtype", None) or torch.float32)
    apply_recipe(model, recipe, statistics=None, range_steps=config.get("range_steps", {}))
    state = _read_weights(folder, config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"the weights in {folder} do not fit its config ({first[:200]}); the export is damaged") from None
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        problems = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise CheckpointError(f"the weights in {folder} do not match its recipe ({', '.join(problems)}); the export is damaged")
    model.tie_weights()
    model.ann2snn = {key: value for key, value in config.items() if key not in ("files", "format_version", "ann2snn_version")}
    return place(model, device_map).eval()
