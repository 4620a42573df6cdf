"""Running a converted model as its ANN and as the SNN over token windows, counting as it goes: one run's report.

The ANN pass (simulation ``"ann"``, the same weights with spiking off) runs
under spikingjelly's `MACCounter` (`DispatchCounterMode`) and the float
operations' hooks (`floats.FloatTally`); the SNN pass (simulation ``"step"``,
so every neuron really fires a `SpikeTrain`) under `ModuleCounterMode` with
the spike counters of `counting`. Both give perplexity, and every decoder
layer's output is compared between them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, ModuleCounterMode
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..modules.attention import SNNMatmul
from ..modules.neuron import SignedNeuron, set_simulation
from ..modules.synapsis import Synapsis
from .counting import SNN_FIELDS, CountCache, SpikeFieldCounter
from .energy import EnergyModel, IntegerModel, MemoryModel, energy_estimate, integer_estimate, memory_traffic
from .floats import FLOAT_COSTS, FloatTally, describe, layer_of


class _Passes:
    """The counters of both passes and the figures gathered batch by batch."""

    def __init__(self, model):
        self.layers = list(model.model.layers)
        self.cache = CountCache()
        self.spike_counters = {field: SpikeFieldCounter(field, self.cache) for field in SNN_FIELDS}
        self.macs = MACCounter()
        self.floats = FloatTally()
        self.cos_sum = [0.0] * len(self.layers)
        self.cos_count = [0] * len(self.layers)
        self.nll_ann = self.nll_snn = 0.0
        self.agree = self.scored = self.passes = 0

    def run(self, model, batch: torch.Tensor) -> None:
        captured: dict[int, torch.Tensor] = {}
        capture = [layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, _hidden(out)))
                   for i, layer in enumerate(self.layers)]
        try:
            set_simulation(model, "ann")
            handles = self.floats.hooks(model)
            try:
                with DispatchCounterMode([self.macs]):
                    logits_ann = model(input_ids=batch, use_cache=False).logits.float()
            finally:
                for handle in handles:
                    handle.remove()
            hidden_ann = dict(captured)
            set_simulation(model, "step")
            handles = self.cache.watch_attention(model)
            try:
                with ModuleCounterMode(list(self.spike_counters.values()), model=model):
                    logits_snn = model(input_ids=batch, use_cache=False).logits.float()
            finally:
                for handle in handles:
                    handle.remove()
                self.cache.clear()
        finally:
            for handle in capture:
                handle.remove()
            set_simulation(model, "fast")
        for i in range(len(self.layers)):
            cos = F.cosine_similarity(hidden_ann[i].flatten(0, -2), captured[i].flatten(0, -2), dim=-1, eps=1e-12)
            self.cos_sum[i] += float(cos.sum())
            self.cos_count[i] += cos.numel()
        targets = batch[:, 1:].reshape(-1)
        vocab = logits_ann.shape[-1]
        self.nll_ann += float(F.cross_entropy(logits_ann[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
        self.nll_snn += float(F.cross_entropy(logits_snn[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
        self.agree += int((logits_ann[:, :-1].argmax(-1) == logits_snn[:, :-1].argmax(-1)).sum())
        self.scored += targets.numel()
        self.passes += 1


def _hidden(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float()


def _total(counts: dict, scope: str) -> int:
    return int(sum(counts.get(scope, {}).values()))


@torch.no_grad()
def build_report(model, windows: torch.Tensor, *, energy: EnergyModel | None = None,
                 integer: IntegerModel | None = None, memory: MemoryModel | None = None, batch_size: int = 4,
                 progress: bool = True) -> dict:
    """Run `model` (a converted SNN) as ANN and as SNN over `windows` [N, L]; one run's report (JSON-ready):
    perplexities, top-1 agreement, per-layer and per-module counts, totals and the three energy views."""
    energy, integer, memory = energy or EnergyModel(), integer or IntegerModel(), memory or MemoryModel()
    if windows.dim() != 2 or windows.numel() == 0:
        raise ConfigError("the report needs token windows [N, L] with at least one token")
    recipe = dict(getattr(model, "ann2snn", {}).get("recipe", {}))
    device = next(model.parameters()).device
    passes = _Passes(model)
    label = f"report T={recipe.get('timesteps', '?')} ({recipe.get('coding', '?')})"
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=label, unit="batch", disable=not progress):
        passes.run(model, windows[start:start + batch_size].to(device))

    root = type(model).__name__
    spikes = {field: counter.get_counts() for field, counter in passes.spike_counters.items()}
    macs = passes.macs.get_counts()
    snn_at = lambda field, name: _total(spikes[field], f"{root}.{name}" if name else "Global")  # noqa: E731
    mac_at = lambda name: _total(macs, f"{root}.{name}" if name else "Global")  # noqa: E731
    modules = _module_rows(model, snn_at, mac_at, passes.cache.operand_bits)
    float_mac, float_flops = _float_bucket(model, mac_at, passes.floats, encodings=snn_at("encodings", None))
    layers = _layer_rows(passes, modules, snn_at)

    tokens = int(windows.numel())
    totals = _totals(model, modules, snn_at, float_mac, float_flops, passes.passes, recipe)
    compute = energy_estimate(totals, energy, tokens)
    return {
        "timesteps": recipe.get("timesteps"), "coding": recipe.get("coding"), "levels": recipe.get("levels"),
        "recipe": recipe.get("name"), "threshold": recipe.get("threshold"),
        # the sites that fire another T than the recipe's (per-site levels below it, the head's input neuron above
        # it), and their T (counted as they fire)
        "level_allocation": recipe.get("level_allocation", "uniform"),
        "site_timesteps": dict(getattr(model, "ann2snn", {}).get("site_timesteps", {})),
        "finetuned": bool(getattr(model, "ann2snn", {}).get("finetune")),
        "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
        "tokens_processed": tokens, "tokens_scored": passes.scored,
        "ppl_ann": math.exp(passes.nll_ann / passes.scored) if passes.scored else float("nan"),
        "ppl_snn": math.exp(passes.nll_snn / passes.scored) if passes.scored else float("nan"),
        "top1_agreement": passes.agree / passes.scored if passes.scored else float("nan"),
        "totals": totals,
        "float_operations": {"mac": float_mac, "flops": float_flops,
                             "costs": {kind: describe(kind) for kind in FLOAT_COSTS}},
        "energy": compute,
        "energy_integer": integer_estimate(totals, integer, energy, tokens),
        "memory": memory_traffic(totals, memory, compute, tokens),
        "layers": layers,
        "modules": modules,
    }


def _layer_rows(passes: _Passes, modules: dict, snn_at) -> list[dict]:
    rows = []
    for i in range(len(passes.layers)):
        scope = f"model.layers.{i}"
        updates = snn_at("neuron_updates", scope)
        layer_flops = dict(passes.floats.flops.get(i, {}))
        float_mac = layer_flops.pop("float attention matmuls (MAC)", 0)
        rows.append({
            "layer": i, "firing_rate": snn_at("spikes", scope) / updates if updates else 0.0,
            "spikes": snn_at("spikes", scope), "neuron_updates": updates,
            "ac": snn_at("ac", scope), "shifts": snn_at("shifts", scope), "bias_adds": snn_at("bias_adds", scope),
            "ann_mac": sum(m.get("ann_mac", 0) for m in modules.values() if m["layer"] == i), "float_mac": float_mac,
            "float_flops": sum(layer_flops.values()) + snn_at("encodings", scope),
            "cosine_similarity": passes.cos_sum[i] / passes.cos_count[i] if passes.cos_count[i] else float("nan"),
        })
    return rows


def _module_rows(model, snn_at, mac_at, operand_bits: dict) -> dict[str, dict]:
    """One row per spiking module, by type: neurons, Synapsis, SNNMatmul."""
    names = {module: name for name, module in model.named_modules()}
    rows: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, SignedNeuron):
            updates = snn_at("neuron_updates", name)
            rows[name] = {
                "kind": "neuron", "layer": layer_of(name), "channels": list(module.delta.shape),
                "neuron_inputs": snn_at("neuron_inputs", name), "spikes": snn_at("spikes", name),
                "positive_spikes": snn_at("positive_spikes", name), "weighted_spikes": snn_at("weighted_spikes", name),
                "neuron_updates": updates, "firing_rate": snn_at("spikes", name) / updates if updates else 0.0,
                "timesteps": module.code.timesteps,  # its own window: per-site levels and range steps differ
            }
            if snn_at("ac", name):  # the attention sink's constant products, driven by this neuron's spikes
                rows[name].update(ac=snn_at("ac", name), shifts=snn_at("shifts", name))
        elif isinstance(module, Synapsis):
            synapse = f"{name}.synapse"
            rows[name] = {
                "kind": "synapsis", "layer": layer_of(name), "in_features": module.in_features,
                "out_features": module.out_features, "input_neuron": names.get(module.neuron, f"{name}.neuron"),
                "ac": snn_at("ac", synapse), "shifts": snn_at("shifts", synapse),
                "bias_adds": snn_at("bias_adds", synapse), "ann_mac": mac_at(name),
                "weights": module.weight.numel(), "timesteps": module.neuron.code.timesteps, "operand_bits": list(operand_bits.get(module.synapse, (None, None))),
            }
        elif isinstance(module, SNNMatmul):
            rows[name] = {"kind": "snn_matmul", "layer": layer_of(name), "ac": snn_at("ac", name),
                          "shifts": snn_at("shifts", name), "ann_mac": snn_at("causal_mac", name),
                          "ann_mac_executed": mac_at(name), "operand_bits": list(operand_bits.get(module, (None, None)))}
    return rows


def _float_bucket(model, mac_at, floats: FloatTally, encodings: int) -> tuple[dict[str, int], dict[str, int]]:
    """MACs and FLOPs of what stays float: each Linear outside the spiking modules by name, the rest of the
    MACs together, float attention's products (the baseline recipe), and the FLOPs by kind."""
    spiking = [name for name, m in model.named_modules() if isinstance(m, (Synapsis, SNNMatmul))]
    mac = {name: mac_at(name) for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and not any(name.startswith(s + ".") for s in spiking)}
    other = mac_at(None) - sum(mac.values()) - sum(mac_at(name) for name in spiking)
    if other:
        mac["other float matmuls"] = other
    flops = floats.totals()
    if "float attention matmuls (MAC)" in flops:
        mac["float attention matmuls"] = flops.pop("float attention matmuls (MAC)")
    return mac, {**flops, "spike encoding": encodings, "embedding lookup": 0}


def _totals(model, modules: dict, snn_at, float_mac: dict, float_flops: dict, passes: int, recipe: dict) -> dict:
    synapses = [m for m in modules.values() if m["kind"] == "synapsis"]
    by_bits: dict[tuple, int] = {}
    for m in modules.values():
        if m["kind"] in ("synapsis", "snn_matmul") and m["ann_mac"]:
            key = tuple(m["operand_bits"])
            by_bits[key] = by_bits.get(key, 0) + m["ann_mac"]
    float_weights = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and name in float_mac)
    totals = {
        "spikes": snn_at("spikes", None), "neuron_updates": snn_at("neuron_updates", None),
        "neuron_inputs": snn_at("neuron_inputs", None),
        "snn_ac": snn_at("ac", None), "snn_shifts": snn_at("shifts", None), "bias_adds": snn_at("bias_adds", None),
        "ann_mac": sum(m["ann_mac"] for m in modules.values() if m["kind"] in ("synapsis", "snn_matmul")),
        "synapsis_mac": sum(m["ann_mac"] for m in synapses), "synapsis_ac": sum(m["ac"] for m in synapses),
        "ann_mac_by_bits": [{"activation_bits": a, "operand_bits": b, "mac": n} for (a, b), n in sorted(
            by_bits.items(), key=lambda item: str(item[0]))],
        "float_mac": sum(float_mac.values()), "float_flops": sum(float_flops.values()) - float_flops["spike encoding"],
        "snn_encoding_flops": float_flops["spike encoding"],
        "spiking_weights": sum(m["weights"] for m in synapses), "float_weights": float_weights,
        "spiking_weight_steps": sum(m["weights"] * m["timesteps"] for m in synapses),  # weights × their input's window
        "passes": passes, "timesteps": recipe.get("timesteps") or 1,
    }
    totals["firing_rate"] = totals["spikes"] / totals["neuron_updates"] if totals["neuron_updates"] else 0.0
    return totals
