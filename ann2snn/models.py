"""Finding and loading the ANN: local folders, hub ids, short names and the embedded model.

Checkpoints are untrusted: weights load from safetensors only, remote code is
refused unless the user asks for it, and a broken folder gives a one-line
`CheckpointError` rather than a traceback.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import CheckpointError, ConfigError, ModelNotFoundError, NumericalError, UnsupportedModelError
from .placement import place

EMBEDDED_MODEL = "qwen2-tiny"
HUB_TIMEOUT_S = 3.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> Path:
    return Path(__file__).resolve().parent / "data" / EMBEDDED_MODEL


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}") from None


def check_seq_len(config, seq_len: int) -> None:
    """Refuse windows longer than the model's positions (`config`: a transformers config or config.json's dict)."""
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is beyond the model's {limit} positions (max_position_embeddings); "
                          f"choose at most {limit}")


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def resolve_model(name: str) -> Path:
    """A local folder for `name`: the embedded model, a folder, or a hub id (short names get `Qwen/`)."""
    if name == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looks_like_path = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"model folder {name} does not exist; pass a local Hugging Face checkpoint folder")
    repo_id = name if "/" in name else f"Qwen/{name}"
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    try:  # already in the local Hugging Face cache?
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to fetch {repo_id}; download it where there is network and pass its local folder"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelNotFoundError(f"could not download {repo_id} ({type(exc).__name__}); pass a local checkpoint folder") from None


def read_config(folder: Path, trust_remote_code: bool = False) -> dict:
    """config.json, checked: JSON, a supported family, no remote code unless trusted."""
    from .recipes import supported_families

    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is damaged")
    if "auto_map" in config and not trust_remote_code:
        raise CheckpointError(
            f"{path} asks to run code shipped with the checkpoint (auto_map); ann2snn refuses it unless you pass --trust-remote-code"
        )
    model_type = config.get("model_type")
    if model_type not in supported_families():
        raise UnsupportedModelError(
            f"model type {model_type!r} ({', '.join(config.get('architectures') or ['unknown architecture'])}) is not supported; "
            f"supported families: {', '.join(supported_families())}"
        )
    return config


def check_weight_files(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index} is not a valid shard index; the checkpoint is damaged") from None
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise CheckpointError(f"{index} names missing shard(s) {', '.join(missing)}; download the whole checkpoint")
    elif not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} has no model.safetensors (ann2snn loads weights from safetensors only); convert .bin weights to safetensors first")


FINITE_CHUNK = 1 << 24  # elements checked at a time: isfinite's temporaries stay small beside a large embedding


def check_finite(model: torch.nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)  # a view for the (contiguous) weights of a checkpoint
        if not all(torch.isfinite(chunk).all() for chunk in flat.split(FINITE_CHUNK)):
            raise NumericalError(f"weight {name} holds NaN or Inf; the checkpoint is damaged")


def load_ann(folder: Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
             device_map: str | None = None):
    """(model, tokenizer) from a checked local folder, in eval mode, placed by `device_map` (`ann2snn.placement`)."""
    from transformers import AutoModelForCausalLM

    read_config(folder, trust_remote_code)
    check_weight_files(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", local_files_only=True, trust_remote_code=trust_remote_code,
            use_safetensors=True, attn_implementation="sdpa", output_loading_info=True, ignore_mismatched_sizes=True,
        )
    except Exception as exc:  # transformers raises many types for damaged files; name the problem in one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the weights in {folder}: {message[:300]}") from None
    problems = [f"missing {k}" for k in info.get("missing_keys", [])] + [f"wrong shape {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match config.json ({'; '.join(sorted(problems)[:3])}); the checkpoint is damaged")
    check_finite(model)
    place(model, device_map)
    return model.eval(), load_tokenizer_from(folder, trust_remote_code)


def load_tokenizer_from(folder: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, with a one-line error when its files are missing or broken."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}); the folder needs its tokenizer files") from None
