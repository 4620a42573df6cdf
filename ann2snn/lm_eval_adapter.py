"""lm-evaluation-harness adapter: evaluate an ann2snn export with `lm_eval`, as model "ann2snn".

Needs the optional extra ``eval`` (lm-eval). Importing this module registers
the model class with lm-eval's model registry under the name ``"ann2snn"``.

lm-eval (0.4.x) looks models up in its registry only and does not discover
plugins through entry points, so the registration has to be imported before
lm-eval resolves ``--model ann2snn``. Either run lm-eval's own command line
through this module, which registers first and then hands every argument to
lm-eval unchanged::

    python -m ann2snn.lm_eval_adapter --model ann2snn --model_args path=out/snn,simulation=fast \\
        --tasks hellaswag --device cpu

or, from Python::

    import lm_eval
    import ann2snn.lm_eval_adapter  # registers "ann2snn"
    lm_eval.simple_evaluate(model="ann2snn", model_args="path=out/snn", tasks=["hellaswag"])

Model arguments: ``path`` (the export folder, required), ``simulation``
(``fast``: exact accumulated spike counts, the default; ``step``: every time
step simulated, the same numbers, slower; ``ann``: the float ANN the SNN came
from, for a baseline with the same weights), ``dtype`` (``float32``,
``bfloat16``, ``float16``; default: the export's) and lm-eval's HFLM options
(``max_length``…). The device comes from lm-eval's ``--device`` (its CLI
always passes one, ``cuda:0`` by default, so do not repeat it in
``--model_args``); CUDA falls back to the CPU where there is none.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ann2snn's lm-eval adapter needs lm-eval: pip install 'ann2snn[eval]'") from exc

import torch

from . import load, load_tokenizer, set_simulation
from .errors import ConfigError
from .modules.neuron import SIMULATIONS

MODEL_NAME = "ann2snn"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_log = logging.getLogger(__name__)

# Registered as a lazy "module:class" target rather than with @register_model: the same string whether this file
# is imported or run with `python -m` (as __main__), so both register the one class without a name collision.
model_registry.register(MODEL_NAME, target=f"{__spec__.name if __spec__ else __name__}:Ann2SnnLM")


def _pick_device(device: str | None) -> str:
    """The requested device; CUDA falls back to the CPU where there is none (lm-eval's CLI asks for cuda:0 by default)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        _log.warning("device %s requested but CUDA is not available; running on the CPU", device)
        return "cpu"
    return device


class Ann2SnnLM(HFLM):
    """lm-eval's HFLM around a loaded ann2snn export (the converted transformers model and its tokenizer)."""

    def __init__(self, path: str | None = None, simulation: str = "fast", device: str | None = None,
                 dtype: str | torch.dtype | None = None, pretrained=None, tokenizer=None, **kwargs):
        if path is None:
            raise ConfigError("the ann2snn lm-eval model needs path=<export folder> in --model_args")
        if pretrained is not None or tokenizer is not None:
            raise ConfigError("the ann2snn lm-eval model loads its model and tokenizer from path=; drop pretrained=/tokenizer=")
        if simulation not in SIMULATIONS:
            raise ConfigError(f"simulation must be one of {', '.join(SIMULATIONS)}, got {simulation!r}")
        if isinstance(dtype, str) and dtype != "auto":
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        model = load(path, dtype if isinstance(dtype, torch.dtype) else None)
        set_simulation(model, simulation)
        model.to(_pick_device(device))
        self.export_path = str(path)
        self.simulation = simulation
        super().__init__(pretrained=model, tokenizer=load_tokenizer(path), backend="causal", **kwargs)

    def get_model_info(self) -> dict:
        recipe = getattr(self.model, "ann2snn", {}).get("recipe", {})
        # HFLM's own version would ask the hub for a model SHA; an export is a local folder.
        return {"model_name": f"ann2snn:{self.export_path}", "simulation": self.simulation,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype),
                "timesteps": recipe.get("timesteps"), "coding": recipe.get("coding"), "recipe": recipe.get("name")}


def main() -> None:
    """lm-eval's command line with the "ann2snn" model registered (same arguments as `lm_eval`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()  # "ann2snn" was registered when this module was imported


if __name__ == "__main__":
    main()
