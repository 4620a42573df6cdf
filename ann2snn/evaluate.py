"""How close the SNN stays to its ANN: perplexity of both and top-1 agreement, on the same tokens.

The ANN is the converted model itself with spiking switched off (every SNN
module then computes its float original), so no second copy is held.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .modules.neuron import set_simulation


@torch.no_grad()
def logits_over(model, windows: torch.Tensor, simulation: str, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    set_simulation(model, simulation)
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=f"{simulation} pass", unit="batch", disable=not progress):
        out.append(model(input_ids=windows[start:start + batch_size].to(device), use_cache=False).logits.float().cpu())
    return torch.cat(out)


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def compare(model, windows: torch.Tensor, simulation: str = "fast", progress: bool = False) -> dict:
    """ppl_ann, ppl_snn and top1_agreement of `model` (converted) over token windows [N, L]."""
    ann = logits_over(model, windows, "ann", progress=progress)
    snn = logits_over(model, windows, simulation, progress=progress)
    set_simulation(model, "fast")
    return {
        "ppl_ann": perplexity(ann, windows),
        "ppl_snn": perplexity(snn, windows),
        "top1_agreement": (ann[:, :-1].argmax(-1) == snn[:, :-1].argmax(-1)).float().mean().item(),
        "tokens": int(windows[:, 1:].numel()),
        "simulation": simulation,
    }
