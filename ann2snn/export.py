"""Export and reload of a converted SNN.

An export folder holds:
- `config.json` — the original model's configuration;
- `snn_config.json` — format version, recipe (coding, T, threshold rule,
  rules), which operations stay in floating point, calibration summary,
  package versions, the SHA-256 of every other file, and its own SHA-256
  (`config_sha256`, of the file's content without that field);
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with an
  index) — weights and every neuron's step Δ;
- `calibration.safetensors` — the statistics, reusable by `--calib-stats`;
- the tokenizer files.

Writing is atomic: everything goes to a hidden sibling folder that is renamed
into place only when complete, so an interrupted or failed export leaves no
half-written folder. `--overwrite` replaces only an ann2snn export or an empty
folder (`check_output`). Loading verifies every hash, snn_config.json's own
included, checks the recipe's values, and refuses a tampered export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_folder, check_writable
from .calibration.calibrate import TOKEN_WINDOWS
from .calibration.head import MAX_EXTRA_STEPS, head_sites
from .calibration.thresholds import THRESHOLD_RULES
from .errors import CheckpointError, ConfigError
from .placement import place
from .replace import swap_modules
from .transforms import OUTLIER_OPTIONS

# 2: a neuron's quantisation step Δ is stored as `delta` (format 1: `step`); 3: snn_config.json holds its own SHA-256;
# 4: Synapsis reading one tensor share one input neuron, stored under its first reader's name, and lm_head may spike
# (recipe "share_inputs", "spiking_head"; before: one neuron per Synapsis, a float head); 5: a site may fire fewer
# steps than the recipe's T ("site_timesteps", per-site levels; before: every site T); 6: the spiking head's input
# neuron may fire more steps than T (in "site_timesteps", recipe "head_steps"; before: the head at T)
FORMAT_VERSION = 6
SNN_CONFIG = "snn_config.json"
CONFIG_HASH = "config_sha256"
CALIBRATION_FILE = "calibration.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def second_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors already named earlier in `state`: tied weights, a neuron shared by several Synapsis."""
    seen, second = set(), set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            second.add(name)
        seen.add(key)
    return second


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the second names (safetensors refuses shared storage), contiguous, on the CPU."""
    second = second_names(state)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if name not in second}


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


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an snn_config.json that reads as an ann2snn export's (damaged or not)."""
    try:
        config = json.loads((folder / SNN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("format_version"), int) and isinstance(config.get("files"), dict)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that may not be replaced or cannot be written.

    `overwrite` replaces an ann2snn export or an empty folder, nothing else: a
    file or a folder of other things is the user's and is refused by name.
    """
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder; choose another --out "
                              "(--overwrite replaces only an ann2snn export or an empty folder)")
        if not overwrite:
            raise ConfigError(f"output folder {out} already exists; choose another --out or pass --overwrite")
        contents = sorted(p.name for p in out.iterdir())
        if contents and not is_export(out):
            shown = ", ".join(contents[:3]) + (", …" if len(contents) > 3 else "")
            raise ConfigError(f"{out} is not an ann2snn export (it holds {shown}); --overwrite replaces only an export "
                              "or an empty folder: choose another --out")
    check_writable(out, ConfigError)


def save(model, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the converted `model` (from `ann2snn.convert`) to `out_dir`, atomically.

    `overwrite` replaces an existing ann2snn export or empty folder there (never anything else)."""
    meta = getattr(model, "ann2snn", None)
    if meta is None:
        raise ConfigError("this model was not converted by ann2snn; call ann2snn.convert first")
    out = Path(out_dir)
    check_output(out, overwrite)
    with atomic_folder(out, CheckpointError, overwrite) as tmp:
        _write_weights(unique_tensors(model.state_dict()), tmp, shard_bytes)
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
    snn_config = {key: value for key, value in meta.items() if key not in ("statistics", CONFIG_HASH)}
    # the calibration's token windows live in calibration.safetensors (save_statistics), not in the config
    snn_config["calibration"] = {key: value for key, value in meta["calibration"].items() if key not in TOKEN_WINDOWS}
    snn_config.update({"format_version": FORMAT_VERSION, "ann2snn_version": __version__, "files": files})
    snn_config[CONFIG_HASH] = config_digest(json.loads(json.dumps(snn_config)))  # digest of what is read back
    (folder / SNN_CONFIG).write_text(json.dumps(snn_config, indent=2, sort_keys=True) + "\n")


def config_digest(config: dict) -> str:
    """SHA-256 of snn_config.json's content without its own digest, in one canonical JSON form."""
    content = {key: value for key, value in config.items() if key != CONFIG_HASH}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    if config["format_version"] >= 3 and config.get(CONFIG_HASH) != config_digest(config):
        raise CheckpointError(f"{path} does not match its own SHA-256 ({CONFIG_HASH}); the export's configuration was "
                              "modified or damaged")
    export_recipe(path, recipe)
    return config


def export_recipe(path: Path, recipe: dict):
    """The `Recipe` that snn_config.json's "recipe" describes; values outside their valid sets are refused by name
    (a hand-edited or damaged snn_config.json)."""
    from .recipes import get_recipe

    unknown = [o for o in recipe["outliers"] if o not in OUTLIER_OPTIONS]
    if unknown:
        raise CheckpointError(f"{path}: outliers {', '.join(unknown)} is not one of {', '.join(OUTLIER_OPTIONS)}; "
                              "the export is damaged")
    if recipe["threshold"] not in THRESHOLD_RULES:
        raise CheckpointError(f"{path}: threshold {recipe['threshold']!r} is not one of {', '.join(THRESHOLD_RULES)}; "
                              "the export is damaged")
    flags = {key: recipe.get(key, False) for key in ("share_inputs", "spiking_head")}  # absent before format 4: off
    head_steps = recipe.get("head_steps", 0)  # absent before format 6: the head at T
    levels = {key: recipe.get(key) for key in ("level_allocation", "max_ppl_ratio", "energy_budget")}  # before 5: uniform
    wrong = [key for key, value in flags.items() if not isinstance(value, bool)]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]} {flags[wrong[0]]!r} is not true or false; the export is damaged")
    try:
        return get_recipe(recipe["name"]).with_options(
            coding=recipe["coding"], timesteps=recipe["timesteps"], threshold=recipe["threshold"],
            headroom=recipe.get("headroom"), outliers=tuple(recipe["outliers"]), range_steps=recipe.get("range_steps", 0),
            level_allocation=levels["level_allocation"] or "uniform", max_ppl_ratio=levels["max_ppl_ratio"],
            energy_budget=levels["energy_budget"], head_steps=head_steps, **flags)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}; the export is damaged") from None


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

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; pass the --out folder of ann2snn convert")
    config = read_snn_config(folder)
    verify(folder, config)
    recipe = export_recipe(folder / SNN_CONFIG, config["recipe"])
    sites = config.get("range_steps", {})
    if not isinstance(sites, dict) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in sites.values()):
        raise CheckpointError(f"{folder / SNN_CONFIG}: range_steps must map sites to positive step counts; the export is damaged")
    site_timesteps = config.get("site_timesteps", {})  # absent before format 5: every site at the recipe's T
    most = recipe.timesteps + MAX_EXTRA_STEPS  # the head's input neuron may fire up to that many (format 6)
    if not isinstance(site_timesteps, dict) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= most for t in site_timesteps.values()):
        raise CheckpointError(f"{folder / SNN_CONFIG}: site_timesteps must map sites to time steps from 1 to {most}; "
                              "the export is damaged")
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype or getattr(model_config, "dtype", None) or torch.float32)
    built = swap_modules(model, recipe, statistics=None, range_steps=sites, site_timesteps=site_timesteps)
    unknown = sorted(set(site_timesteps) - set(built.neurons))
    if unknown:
        raise CheckpointError(f"{folder / SNN_CONFIG}: site_timesteps names {unknown[0]}, which this model has no neuron "
                              "for; the export is damaged")
    above = sorted(site for site, t in site_timesteps.items() if t > recipe.timesteps and site not in head_sites(built))
    if above:
        raise CheckpointError(f"{folder / SNN_CONFIG}: site_timesteps gives {above[0]} more steps than the recipe's "
                              f"{recipe.timesteps}, which only the head's input neuron may fire; the export is damaged")
    state = _read_weights(folder, config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"the weights in {folder} do not fit its config ({first[:200]}); the export is damaged") from None
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    tied |= second_names(model.state_dict())  # written once, under their first name (save)
    if unexpected or set(missing) - tied:
        problems = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise CheckpointError(f"the weights in {folder} do not match its recipe ({', '.join(problems)}); the export is damaged")
    model.tie_weights()
    model.ann2snn = {key: value for key, value in config.items()
                     if key not in ("files", "format_version", "ann2snn_version", CONFIG_HASH)}
    return place(model, device_map).eval()
