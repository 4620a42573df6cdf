"""ann2snn: convert Qwen-style language models into spiking neural networks that still generate text.

The flow, one module per stage:
    calibration/  — read text, run the ANN, gather per-channel statistics
    replace.py    — apply a recipe's rules (recipes/) to swap in SNN modules (modules/)
    export.py     — write and reload the converted model, verified
"""

__version__ = "0.1.0"

from pathlib import Path as _Path


def load_ann(model: str, dtype=None, trust_remote_code: bool = False, device_map: str | None = None):
    """(model, tokenizer) for a local folder, a hub id, a short name or the embedded 'qwen2-tiny'.

    `device_map`: None / "cpu", a device ("cuda:0") or "auto" (spread over the GPUs; `ann2snn.placement`)."""
    from .models import load_ann as _load, resolve_model

    return _load(resolve_model(model), dtype, trust_remote_code, device_map)


def load_tokenizer(folder: str | _Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


from .convert import convert  # noqa: E402
from .export import load, save  # noqa: E402
from .modules.neuron import set_simulation  # noqa: E402

__all__ = ["__version__", "convert", "save", "load", "load_ann", "load_tokenizer", "set_simulation"]
