"""ann2snn: convert Qwen-style language models into spiking neural networks that still generate text.

The whole pipeline in one call (what `ann2snn convert` runs):

    import ann2snn
    summary = ann2snn.convert_and_export("qwen2-tiny", "tiny-snn", timesteps=8)

The flow, one module per stage:
    calibration/  — read text, run the ANN, gather per-channel statistics
    replace.py    — apply a recipe's rules (recipes/) to swap in SNN modules (modules/)
    export.py     — write and reload the converted model, verified
    pipeline.py   — the stages in order, resumable: convert_and_export, finetune_export, generate_text, evaluate_export

The names below are imported on first use, so that `import ann2snn` (and `ann2snn --help`) does not
import torch and transformers.
"""

import importlib
import sys
import types
from pathlib import Path as _Path

__version__ = "0.1.0"

# public name → the module that defines it
_LAZY = {
    "convert": ".convert",
    "save": ".export",
    "load": ".export",
    "set_simulation": ".modules.neuron",
    "convert_and_export": ".pipeline",
    "finetune_export": ".pipeline",
    "generate_text": ".pipeline",
    "evaluate_export": ".pipeline",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ann2snn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The ann2snn package: importing its submodule convert.py must not replace the function `ann2snn.convert`.

    (Python binds every imported submodule as an attribute of its package; eager imports used to rebind the
    function afterwards, lazy ones cannot.)"""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load_ann(model: str, dtype=None, trust_remote_code: bool = False, device_map: str | None = None):
    """(model, tokenizer) for a local folder, a hub id, a short name or the embedded 'qwen2-tiny'.

    `device_map`: None / "cpu", a device ("cuda:0") or "auto" (spread over the GPUs; `ann2snn.placement`)."""
    from .models import load_ann as _load, resolve_model

    return _load(resolve_model(model), dtype, trust_remote_code, device_map)


def load_tokenizer(model: str | _Path, trust_remote_code: bool = False):
    """The tokenizer of an export folder, a checkpoint folder, a hub id, a short name or the embedded 'qwen2-tiny'."""
    from .models import load_tokenizer_from, resolve_model

    return load_tokenizer_from(resolve_model(str(model)), trust_remote_code)


__all__ = ["__version__", "convert", "save", "load", "load_ann", "load_tokenizer", "set_simulation",
           "convert_and_export", "finetune_export", "generate_text", "evaluate_export"]
