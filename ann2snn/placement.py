"""Where a model runs: the CPU, one device, or spread over the GPUs and CPU memory there are.

`place(model, device_map)` takes what ``--device-map`` takes:

- ``None`` / ``"cpu"``: the CPU (the default);
- a device (``"cuda"``, ``"cuda:1"``, ``"mps"``): the whole model there;
- ``"auto"``: accelerate's `infer_auto_device_map` assigns whole decoder layers
  (never split: the model's ``_no_split_modules``) to the GPUs, balanced, and
  what does not fit to CPU memory; `dispatch_model` then hooks each block so
  that its inputs move to its device. Without a GPU it is the CPU.

accelerate would *offload* the CPU's share when a GPU leads: keep those
weights aside and lend them to the module, on the GPU, for each forward. ann2snn
writes into the modules in place — calibrated thresholds become buffers beside
the weights, ``--outliers rotate/smooth`` and the fine-tune rewrite weights —
and writes to a lent copy are lost. So here the CPU's layers *run* on the CPU
(``main_device="cpu"``: nothing is offloaded), and a model too large for GPU and
CPU memory together fails with a message instead of going to disk.

Converted modules are built on the device of the module they replace
(`ann2snn.replace.apply_recipe`), so a placed ANN converts into a placed SNN
with the same device map, and `ann2snn.load(..., device_map=...)` places an
export the same way.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .errors import ConfigError


def check_device_map(value: str | None) -> str | None:
    """Validate a --device-map value before anything loads: None, "auto" (accelerate importable) or an available device."""
    if value is None or value == "cpu":
        return value
    if value == "auto":
        if accelerators() and importlib.util.find_spec("accelerate") is None:
            raise ConfigError("--device-map auto needs accelerate to spread a model over GPUs: pip install accelerate")
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device-map {value!r} is neither 'auto' nor a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return value
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"device {device} is not available on this machine; use --device-map cpu (or auto)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {device} does not exist: this machine has {count} {device.type} device(s)")
    return value


def accelerators() -> int:
    """How many CUDA devices torch sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(model: nn.Module, max_memory: dict | None = None) -> dict[str, int | str]:
    """accelerate's device map for `model`: whole decoder layers per GPU, balanced, the rest on "cpu"."""
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise ConfigError("--device-map auto needs accelerate: pip install accelerate") from None
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if max_memory is None:
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values():
        raise ConfigError("the model does not fit in the GPUs' and CPU's memory together; "
                          "ann2snn does not offload to disk: use a machine with more memory or a smaller --dtype")
    return device_map


def dispatch(model: nn.Module, device_map: dict[str, int | str], force_hooks: bool = False) -> nn.Module:
    """Put each block of `device_map` on its device, with hooks that move its inputs; nothing is offloaded."""
    from accelerate import dispatch_model

    # main_device "cpu": the CPU's layers run on the CPU instead of being offloaded to a GPU (module docstring)
    dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=force_hooks,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = dict(device_map)
    return model


def place(model: nn.Module, device_map: str | None) -> nn.Module:
    """Move `model` as `device_map` says (module docstring); returns it."""
    device_map = check_device_map(device_map)
    if device_map is None or device_map == "cpu":
        return model
    if device_map != "auto":
        return model.to(torch.device(device_map))
    if accelerators() == 0:
        return model  # nothing to spread over: the CPU holds it all
    device_map = plan(model)
    devices = set(device_map.values())
    if len(devices) == 1:
        (device,) = devices
        return model.to(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
    return dispatch(model, device_map)

