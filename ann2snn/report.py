"""What a converted SNN does, counted: spikes, synaptic operations, the ANN's MACs, fidelity and an energy estimate.

`build_report(model, windows)` runs the converted model twice over each batch
of token windows, on the same weights:

- as its ANN (simulation ``"ann"``), under spikingjelly's `MACCounter`
  (`DispatchCounterMode`): the multiply-accumulates of every layer, the
  reference perplexity and hidden states;
- as the SNN (simulation ``"step"``, so every neuron really fires a
  `SpikeTrain`), under spikingjelly's `ModuleCounterMode` with counters written
  here for ann2snn's modules: spikes per `SignedNeuron`, accumulates (AC) and
  shifts driven by them in every `Synapsis` and `SNNMatmul`.

Counting conventions (also written into every report, see `CONVENTIONS`):

- **Synapsis**: a spike (±1) of input neuron i adds (or subtracts) column i of
  W·diag(Δ) into the out_features outputs: out_features ACs per spike. The step
  Δ is folded into the weights once, so no spike needs a multiply.
- **SNNMatmul** computes Σ_t (A_≤t @ b_t + a_t @ B_<t) (see
  modules/attention.py). A spike of b at (k, n) meets column k of the running
  sum A_≤t: M ACs (M = rows of a). A spike of a at (m, k) meets row k of B_<t:
  N ACs (N = columns of b) — none at t = 0, where B_<0 is empty. Each spike is
  also added once into its own operand's running sum (1 AC). The step sizes fold
  into those running sums or into the output's scale, so again no multiply. The
  k and v trains reach the product repeated for each query head of a group
  (grouped-query attention) and are counted per head, as a per-head datapath
  would run them.
- **Weighted spikes** (phase code: w_t = 2^(T−1−t)): every AC driven by a spike
  whose weight is not 1 also costs one shift (w_t is a power of two). Shifts are
  counted separately and priced at E_shift (default E_AC). Rate-coded spikes
  (w_t = 1) need none.
- **Neurons**: a neuron's T compare-and-subtract membrane updates are counted
  (`neuron_updates`) but, as in SynOp-based estimates, not charged unless
  `e_neuron_pj` is set. Turning a float input current into a membrane potential
  (x/Δ) is one float operation per neuron input (`spike encoding`).
- **Float operations** stay float in both models and are counted, not hidden:
  lm_head and any other float matmul as MACs (spikingjelly's MACCounter on the
  ANN pass), RMSNorm, RoPE, attention scaling, softmax (max, subtract, exp, row
  sum, divide), SiLU, gate ⊙ up and residual additions as FLOPs from their
  shapes, with the per-element costs in `FLOAT_COSTS`; each FLOP is priced at
  E_float (default E_MAC, an upper bound).
- **ANN**: the same layers as dense matmuls, counted by spikingjelly's
  MACCounter as executed (attention scores over the full causal square).

Energy uses the 45 nm convention (Horowitz, ISSCC 2014) common in SNN papers
and in spikingjelly's `SimpleEnergyCostConfig.fp32()`: E_MAC = 4.6 pJ,
E_AC = 0.9 pJ (32-bit float), memory traffic not included.

Why spikingjelly's own SynOp/AC/MAC counters are not used on the SNN pass:
they intercept aten matmuls and recognise a spike tensor only as values in
{0, 1}. ann2snn's spikes are ternary (−1/0/+1), weighted per step (phase code),
travel as `SpikeTrain` objects whose step Δ is folded into the weights before
the matmul, and the simulation's telescoped product multiplies *accumulated*
(non-binary) values by one step's spikes. Those counters would see float
matmuls and count MACs (MACCounter) or nothing (SynOp/AC). So the SNN counts
come from module-level counters (`ModuleCounter` subclasses run by
spikingjelly's `ModuleCounterMode`) that read the actual spike tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from spikingjelly.activation_based.op_counter import (
    DispatchCounterMode,
    MACCounter,
    ModuleCounter,
    ModuleCounterMode,
    SimpleEnergyCostConfig,
)
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .errors import CheckpointError, ConfigError
from .modules.attention import SNNMatmul, SpikingAttention, group_heads, head_groups
from .modules.neuron import SignedNeuron, SpikeTrain, set_simulation
from .modules.synapsis import Synapsis, SynapticWeights
from .placement import place

REPORT_VERSION = 1
_HORIZON = SimpleEnergyCostConfig.fp32()  # 45 nm, 32-bit float: E_MAC 4.6 pJ, E_AC 0.9 pJ

# FLOPs per element of the float operations that stay in floating point (both models).
FLOAT_COSTS = {
    "rmsnorm": "4 per element (square, sum, × rsqrt, × weight) + 3 per row (mean, + eps, rsqrt)",
    "rope": "3 per element of q and k (× cos, × sin, add)",
    "attention scaling": "1 per score (× 1/sqrt(head_dim))",
    "softmax": "4 per score (row max, subtract, exp, row-sum add) + 1 per output element (divide by row sum)",
    "silu": "4 per element (exp, add, divide, multiply)",
    "gate * up": "1 per intermediate element",
    "residual additions": "2 per hidden element per decoder layer",
    "spike encoding": "1 per neuron input (x / Δ), SNN only",
    "embedding lookup": "0 (a memory read)",
}

CONVENTIONS = {
    "synapsis": "each input spike (±1) drives out_features ACs (Δ folded into the weights)",
    "snn_matmul": "Σ_t (A_≤t @ b_t + a_t @ B_<t): a spike of b meets a column of A (M ACs), a spike of a meets a row of "
                  "B_<t (N ACs, none at t=0), and each spike is added once into its running sum (1 AC); "
                  "k/v trains counted per query head (GQA repeat)",
    "weighted_spikes": "each AC driven by a spike of weight w_t ≠ 1 (phase code) also costs one shift",
    "neurons": "T membrane updates per neuron input are counted, charged at e_neuron_pj (0 by default: SynOp convention)",
    "float": "operations that stay float are counted in the float bucket for both models: matmuls as MACs, the rest as "
             "FLOPs priced at e_float_pj",
    "ann": "dense matmuls as executed, counted by spikingjelly's MACCounter (attention over the full causal square)",
    "bias": "bias additions: one AC per output element, in both models",
}


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in pJ. Defaults: the 45 nm convention (Horowitz 2014), as spikingjelly's fp32 preset."""

    e_mac_pj: float = _HORIZON.e_mac_pj
    e_ac_pj: float = _HORIZON.e_ac_pj
    e_shift_pj: float | None = None  # None: same as e_ac_pj
    e_float_pj: float | None = None  # None: same as e_mac_pj
    e_neuron_pj: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite non-negative number of pJ, got {value!r}")

    @property
    def shift(self) -> float:
        return self.e_ac_pj if self.e_shift_pj is None else self.e_shift_pj

    @property
    def float_op(self) -> float:
        return self.e_mac_pj if self.e_float_pj is None else self.e_float_pj

    def describe(self) -> dict:
        default = (self.e_mac_pj, self.e_ac_pj) == (_HORIZON.e_mac_pj, _HORIZON.e_ac_pj)
        return {
            "name": "45nm-horowitz2014-fp32" if default else "custom",
            "text": ("45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014; spikingjelly SimpleEnergyCostConfig.fp32): "
                     if default else "custom energies: ")
                    + f"E_MAC = {self.e_mac_pj} pJ, E_AC = {self.e_ac_pj} pJ, E_shift = {self.shift} pJ"
                    + (" (= E_AC)" if self.e_shift_pj is None else "")
                    + f", float FLOP = {self.float_op} pJ" + (" (= E_MAC, upper bound)" if self.e_float_pj is None else "")
                    + f", neuron update = {self.e_neuron_pj} pJ; compute only, no memory traffic",
            "e_mac_pj": self.e_mac_pj,
            "e_ac_pj": self.e_ac_pj,
            "e_shift_pj": self.shift,
            "e_float_pj": self.float_op,
            "e_neuron_pj": self.e_neuron_pj,
        }


# ---------------------------------------------------------------------------------------------------------------
# Counting from spike trains


def _per_step_nonzero(spikes: torch.Tensor) -> torch.Tensor:
    """Nonzero spikes at each step, [T] (int64)."""
    return spikes.reshape(spikes.shape[0], -1).count_nonzero(dim=1).cpu()


def _shifted(weights: torch.Tensor) -> torch.Tensor:
    """Steps whose spikes are weighted (w_t ≠ 1): each AC they drive needs a shift."""
    return (weights.cpu() != 1)


def neuron_counts(train: SpikeTrain) -> dict:
    """Spikes of one neuron layer's output train."""
    per_step = _per_step_nonzero(train.spikes)
    steps = train.timesteps
    inputs = train.spikes[0].numel()
    return {
        "spikes": int(per_step.sum()),
        "positive_spikes": int((train.spikes > 0).sum()),
        "weighted_spikes": int(per_step[_shifted(train.weights)].sum()),
        "neuron_inputs": int(inputs),
        "neuron_updates": int(inputs * steps),
        "encodings": int(inputs),
    }


def synapsis_counts(train: SpikeTrain, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """ACs and shifts of SynapticWeights driven by `train` (input spikes [T, ..., in_features])."""
    out_features = weight.shape[0]
    per_step = _per_step_nonzero(train.spikes)
    rows = train.spikes[0].numel() // train.spikes.shape[-1]
    return {
        "ac": int(per_step.sum()) * out_features,
        "shifts": int(per_step[_shifted(train.weights)].sum()) * out_features,
        "bias_adds": rows * out_features if bias is not None else 0,
    }


def matmul_counts(a: SpikeTrain, b: SpikeTrain) -> dict:
    """ACs and shifts of snn_matmul(a, b): a spikes [T, ..., M, K], b spikes [T, ..., K, N] (see CONVENTIONS).

    Grouped-query heads (a with g times b's heads) count as snn_matmul runs them:
    the g heads' rows stacked against one head of b, whose running sum is kept once.
    """
    groups = head_groups(a.spikes.shape[1:], b.spikes.shape[1:])
    a_spikes = group_heads(a.spikes, groups) if groups > 1 else a.spikes
    m, n = a_spikes.shape[-2], b.spikes.shape[-1]
    batch_a, batch_b = a_spikes.shape[1:-2], b.spikes.shape[1:-2]
    batch = torch.broadcast_shapes(batch_a, batch_b)
    repeat_a = math.prod(batch) // math.prod(batch_a)  # broadcast batch dims: a spike meets each copy
    repeat_b = math.prod(batch) // math.prod(batch_b)
    na, nb = _per_step_nonzero(a.spikes), _per_step_nonzero(b.spikes)
    wa, wb = _shifted(a.weights), _shifted(b.weights)
    later = torch.arange(na.shape[0]) >= 1  # B_<0 is empty: a's spikes at t = 0 meet nothing
    ac = int(nb.sum()) * m * repeat_b + int(na[later].sum()) * n * repeat_a + int(na.sum()) + int(nb.sum())
    shifts = (int(nb[wb].sum()) * m * repeat_b + int(na[later & wa].sum()) * n * repeat_a
              + int(na[wa].sum()) + int(nb[wb].sum()))
    return {"ac": ac, "shifts": shifts}


class _CountCache:
    """Computes a module call's counts once for all the counters that read it (they share the hook call)."""

    def __init__(self):
        self._last = None

    def get(self, module, args, out) -> dict:
        key = (module, args[0] if args else None, out)
        if self._last is not None and all(x is y for x, y in zip(self._last[0], key)):
            return self._last[1]
        counts = {}
        if isinstance(module, SignedNeuron) and isinstance(out, SpikeTrain):
            counts = neuron_counts(out)
        elif isinstance(module, SynapticWeights) and args and isinstance(args[0], SpikeTrain):
            counts = synapsis_counts(args[0], module.weight, module.bias)
        elif isinstance(module, SNNMatmul) and len(args) == 2 and all(isinstance(x, SpikeTrain) for x in args):
            counts = matmul_counts(*args)
        self._last = (key, counts)
        return counts

    def clear(self) -> None:
        self._last = None


class SpikeFieldCounter(ModuleCounter):
    """A spikingjelly ModuleCounter reading one field of ann2snn's spike counts per module call."""

    def __init__(self, field: str, cache: _CountCache):
        super().__init__()
        self.field = field
        rule = lambda module, args, kwargs, out: cache.get(module, args, out).get(field, 0)  # noqa: E731
        self.rules = {("forward", cls): rule for cls in (SignedNeuron, SynapticWeights, SNNMatmul)}


SNN_FIELDS = ("spikes", "positive_spikes", "weighted_spikes", "neuron_inputs", "neuron_updates", "encodings",
              "ac", "shifts", "bias_adds")


# ---------------------------------------------------------------------------------------------------------------
# Float operations (same shapes in both models), counted from module inputs and outputs


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


class _FloatTally:
    """FLOPs of the operations that stay float, per decoder layer (None: outside the layers)."""

    def __init__(self):
        self.flops: dict[int | None, dict[str, int]] = {}

    def add(self, layer, kind, value) -> None:
        bucket = self.flops.setdefault(layer, {})
        bucket[kind] = bucket.get(kind, 0) + int(value)

    def hooks(self, model) -> list:
        handles = []
        for name, module in model.named_modules():
            layer = _layer_of(name)
            cls = type(module).__name__
            if cls.endswith("RMSNorm"):
                def norm(mod, args, out, layer=layer):
                    x = args[0]
                    self.add(layer, "rmsnorm", 4 * x.numel() + 3 * (x.numel() // x.shape[-1]))
                handles.append(module.register_forward_hook(norm))
            elif isinstance(module, SpikingAttention):
                def attention(mod, args, out, layer=layer):
                    query, key = args[0], args[1]
                    b, h, s, d = query.shape
                    scores = b * h * s * key.shape[-2]
                    self.add(layer, "rope", 3 * (query.numel() + key.numel()))
                    self.add(layer, "attention scaling", scores)
                    self.add(layer, "softmax", 4 * scores + b * h * s * d)
                handles.append(module.register_forward_hook(attention))
            elif name.endswith(".mlp.act_fn"):
                def act(mod, args, out, layer=layer):
                    self.add(layer, "silu", 4 * args[0].numel())
                    self.add(layer, "gate * up", args[0].numel())
                handles.append(module.register_forward_hook(act))
            elif cls.endswith("DecoderLayer"):
                def residual(mod, args, out, layer=layer):
                    hidden = out[0] if isinstance(out, tuple) else out
                    self.add(layer, "residual additions", 2 * hidden.numel())
                handles.append(module.register_forward_hook(residual))
            elif cls.endswith("Attention") and not hasattr(module, "snn"):
                # Float attention (the braintransformers baseline): its sdpa kernel escapes MACCounter.
                def float_attention(mod, args, kwargs, out, layer=layer):
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    b, s = hidden.shape[:2]
                    heads, dim = mod.config.num_attention_heads, mod.head_dim
                    scores = b * heads * s * s
                    self.add(layer, "float attention matmuls (MAC)", 2 * scores * dim)
                    self.add(layer, "rope", 3 * b * s * dim * (heads + mod.config.num_key_value_heads))
                    self.add(layer, "attention scaling", scores)
                    self.add(layer, "softmax", 4 * scores + b * heads * s * dim)
                handles.append(module.register_forward_hook(float_attention, with_kwargs=True))
        return handles


# ---------------------------------------------------------------------------------------------------------------
# The report


def _scope_total(counts: dict, scope: str) -> int:
    return int(sum(counts.get(scope, {}).values()))


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def build_report(model, windows: torch.Tensor, *, energy: EnergyModel | None = None, batch_size: int = 4,
                 progress: bool = True) -> dict:
    """Run `model` (a converted SNN) as ANN and as SNN (step simulation) over `windows` [N, L]; one run's report.

    Returns a JSON-ready dict: perplexities, top-1 agreement, per-layer and
    per-module spike and operation counts, cosine similarity of every decoder
    layer's output, totals and the energy estimate (see the module docstring).
    """
    energy = energy or EnergyModel()
    if windows.dim() != 2 or windows.numel() == 0:
        raise ConfigError("the report needs token windows [N, L] with at least one token")
    recipe = dict(getattr(model, "ann2snn", {}).get("recipe", {}))
    device = next(model.parameters()).device
    root = type(model).__name__
    layers = list(model.model.layers)

    cache = _CountCache()
    snn_counters = {field: SpikeFieldCounter(field, cache) for field in SNN_FIELDS}
    mac_counter = MACCounter()
    floats = _FloatTally()
    cos_sum = [0.0] * len(layers)
    cos_count = [0] * len(layers)
    captured: dict[int, torch.Tensor] = {}
    nll_ann = nll_snn = 0.0
    agree = scored = 0

    def capture(index):
        def hook(module, args, out):
            captured[index] = _first_tensor(out).detach().float()
        return hook

    layer_hooks = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    label = f"report T={recipe.get('timesteps', '?')} ({recipe.get('coding', '?')})"
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=label, unit="batch", disable=not progress):
            batch = windows[start:start + batch_size].to(device)
            # ANN pass: MACs by spikingjelly's counter, float operations by shape.
            set_simulation(model, "ann")
            float_handles = floats.hooks(model)
            try:
                with DispatchCounterMode([mac_counter]):
                    logits_ann = model(input_ids=batch, use_cache=False).logits.float()
            finally:
                for handle in float_handles:
                    handle.remove()
            hidden_ann = dict(captured)
            captured.clear()
            # SNN pass: every neuron fires for T steps.
            set_simulation(model, "step")
            mode = ModuleCounterMode(list(snn_counters.values()), model=model)
            with mode:
                logits_snn = model(input_ids=batch, use_cache=False).logits.float()
            cache.clear()
            for i in range(len(layers)):
                cos = F.cosine_similarity(hidden_ann[i].flatten(0, -2), captured[i].flatten(0, -2), dim=-1, eps=1e-12)
                cos_sum[i] += float(cos.sum())
                cos_count[i] += cos.numel()
            captured.clear()
            targets = batch[:, 1:].reshape(-1)
            vocab = logits_ann.shape[-1]
            nll_ann += float(F.cross_entropy(logits_ann[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
            nll_snn += float(F.cross_entropy(logits_snn[:, :-1].reshape(-1, vocab), targets, reduction="sum"))
            agree += int((logits_ann[:, :-1].argmax(-1) == logits_snn[:, :-1].argmax(-1)).sum())
            scored += targets.numel()
    finally:
        for handle in layer_hooks:
            handle.remove()
        set_simulation(model, "fast")

    snn = {field: counter.get_counts() for field, counter in snn_counters.items()}
    macs = mac_counter.get_counts()

    def snn_at(field, name):
        return _scope_total(snn[field], f"{root}.{name}" if name else "Global")

    def mac_at(name):
        return _scope_total(macs, f"{root}.{name}" if name else "Global")

    modules: dict[str, dict] = {}
    spiking_mac = 0
    for name, module in model.named_modules():
        if isinstance(module, SignedNeuron):
            steps = snn_at("neuron_updates", name)
            modules[name] = {
                "kind": "neuron", "layer": _layer_of(name), "channels": list(module.delta.shape),
                "neuron_inputs": snn_at("neuron_inputs", name), "spikes": snn_at("spikes", name),
                "positive_spikes": snn_at("positive_spikes", name), "weighted_spikes": snn_at("weighted_spikes", name),
                "neuron_updates": steps, "firing_rate": snn_at("spikes", name) / steps if steps else 0.0,
            }
        elif isinstance(module, Synapsis):
            ann_mac = mac_at(name)
            spiking_mac += ann_mac
            modules[name] = {
                "kind": "synapsis", "layer": _layer_of(name), "in_features": module.in_features,
                "out_features": module.out_features, "input_neuron": f"{name}.neuron",
                "ac": snn_at("ac", f"{name}.synapse"), "shifts": snn_at("shifts", f"{name}.synapse"),
                "bias_adds": snn_at("bias_adds", f"{name}.synapse"), "ann_mac": ann_mac,
            }
        elif isinstance(module, SNNMatmul):
            ann_mac = mac_at(name)
            spiking_mac += ann_mac
            modules[name] = {"kind": "snn_matmul", "layer": _layer_of(name), "ac": snn_at("ac", name),
                             "shifts": snn_at("shifts", name), "ann_mac": ann_mac}

    float_mac = {"lm_head": mac_at("lm_head")}
    other_mac = mac_at(None) - spiking_mac - float_mac["lm_head"]
    if other_mac:
        float_mac["other float matmuls"] = other_mac
    float_flops: dict[str, int] = {}
    for bucket in floats.flops.values():
        for kind, value in bucket.items():
            float_flops[kind] = float_flops.get(kind, 0) + value
    if "float attention matmuls (MAC)" in float_flops:
        float_mac["float attention matmuls"] = float_flops.pop("float attention matmuls (MAC)")
    float_flops["embedding lookup"] = 0
    encodings = snn_at("encodings", None)

    layer_rows = []
    for i in range(len(layers)):
        scope = f"model.layers.{i}"
        steps = snn_at("neuron_updates", scope)
        layer_flops = dict(floats.flops.get(i, {}))
        layer_float_mac = layer_flops.pop("float attention matmuls (MAC)", 0)
        layer_rows.append({
            "layer": i,
            "firing_rate": snn_at("spikes", scope) / steps if steps else 0.0,
            "spikes": snn_at("spikes", scope), "neuron_updates": steps,
            "ac": snn_at("ac", scope), "shifts": snn_at("shifts", scope), "bias_adds": snn_at("bias_adds", scope),
            "ann_mac": mac_at(scope), "float_mac": layer_float_mac,
            "float_flops": sum(layer_flops.values()) + snn_at("encodings", scope),
            "cosine_similarity": cos_sum[i] / cos_count[i] if cos_count[i] else float("nan"),
        })

    totals = {
        "spikes": snn_at("spikes", None), "neuron_updates": snn_at("neuron_updates", None),
        "snn_ac": snn_at("ac", None), "snn_shifts": snn_at("shifts", None), "bias_adds": snn_at("bias_adds", None),
        "ann_mac": spiking_mac, "float_mac": sum(float_mac.values()),
        "float_flops": sum(float_flops.values()), "snn_encoding_flops": encodings,
    }
    totals["firing_rate"] = totals["spikes"] / totals["neuron_updates"] if totals["neuron_updates"] else 0.0
    tokens = int(windows.numel())
    result = {
        "timesteps": recipe.get("timesteps"), "coding": recipe.get("coding"), "levels": recipe.get("levels"),
        "recipe": recipe.get("name"), "threshold": recipe.get("threshold"),
        "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
        "tokens_processed": tokens, "tokens_scored": scored,
        "ppl_ann": math.exp(nll_ann / scored) if scored else float("nan"),
        "ppl_snn": math.exp(nll_snn / scored) if scored else float("nan"),
        "top1_agreement": agree / scored if scored else float("nan"),
        "totals": totals,
        "float_operations": {"mac": float_mac, "flops": {**float_flops, "spike encoding": encodings},
                             "costs": FLOAT_COSTS},
        "energy": energy_estimate(totals, energy, tokens),
        "layers": layer_rows,
        "modules": modules,
    }
    return result


def energy_estimate(totals: dict, energy: EnergyModel, tokens: int) -> dict:
    """ANN and SNN energy in pJ from the operation totals (see EnergyModel and CONVENTIONS)."""
    float_common = totals["float_mac"] * energy.e_mac_pj + totals["float_flops"] * energy.float_op
    bias = totals["bias_adds"] * energy.e_ac_pj
    ann_spiking = totals["ann_mac"] * energy.e_mac_pj
    snn_spiking = (totals["snn_ac"] * energy.e_ac_pj + totals["snn_shifts"] * energy.shift
                   + totals["neuron_updates"] * energy.e_neuron_pj)
    snn_encoding = totals["snn_encoding_flops"] * energy.float_op
    ann_total = ann_spiking + bias + float_common
    snn_total = snn_spiking + snn_encoding + bias + float_common
    return {
        "convention": energy.describe(),
        "ann_pj": ann_total, "snn_pj": snn_total,
        "ann_pj_per_token": ann_total / tokens, "snn_pj_per_token": snn_total / tokens,
        "snn_over_ann": snn_total / ann_total if ann_total else float("nan"),
        "breakdown_pj": {
            "ann: spiking layers as MACs": ann_spiking,
            "snn: spike-driven ACs": totals["snn_ac"] * energy.e_ac_pj,
            "snn: shifts of weighted spikes": totals["snn_shifts"] * energy.shift,
            "snn: neuron updates": totals["neuron_updates"] * energy.e_neuron_pj,
            "snn: spike encoding (float)": snn_encoding,
            "both: bias additions": bias,
            "both: float MACs": totals["float_mac"] * energy.e_mac_pj,
            "both: float FLOPs": totals["float_flops"] * energy.float_op,
        },
        "spiking_layers_only": {
            "ann_pj": ann_spiking, "snn_pj": snn_spiking,
            "snn_over_ann": snn_spiking / ann_spiking if ann_spiking else float("nan"),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Several T: rebuild the SNN from the export's calibration statistics


def ann_from_export(folder: str | Path):
    """The export's original ANN: a plain transformers model holding the export's weights (neurons removed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export import _read_weights, read_snn_config, verify

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; pass the --out folder of ann2snn convert")
    config = read_snn_config(folder)
    verify(folder, config)
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(model_config, "dtype", None) or torch.float32)
    state = {}
    for key, value in _read_weights(folder, config).items():
        if ".synapse." in key:
            state[key.replace(".synapse.", ".")] = value
        elif ".snn.sink_" in key:  # the attention sink's constants: recomputed from the ANN when rebuilt
            continue
        elif not (key.endswith(".delta") and (".neuron." in key or ".snn." in key or "_neuron." in key)):
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        problems = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise CheckpointError(f"cannot rebuild the ANN of {folder} ({', '.join(problems)}); the export is damaged")
    model.tie_weights()
    return model.eval()


def rebuild_at(folder: str | Path, timesteps: int, seed: int = 0, device_map: str | None = None):
    """The export converted again at `timesteps`, from its own weights and calibration statistics, placed by `device_map`.

    Thresholds: an export whose rule and headroom are the recipe's level-table
    defaults at its own T is rebuilt with the table's defaults at `timesteps`
    (as `convert --timesteps` would choose them); any other rule and headroom are kept, and so is its
    range-step option (an export from before range steps has none).
    """
    from .calibration.calibrate import load_statistics
    from .convert import convert
    from .export import CALIBRATION_FILE, read_snn_config
    from .recipes import get_recipe

    folder = Path(folder)
    options = read_snn_config(folder)["recipe"]
    own = get_recipe(options.get("name", "qwen2")).with_options(coding=options.get("coding"), timesteps=options.get("timesteps"))
    chosen = (options.get("threshold"), options.get("headroom"))
    threshold, headroom = (None, None) if chosen == (own.chosen_threshold, own.chosen_headroom) else chosen
    stats_file = folder / CALIBRATION_FILE
    if not stats_file.is_file():
        raise CheckpointError(f"{folder} has no {CALIBRATION_FILE}, so it cannot be rebuilt at T={timesteps}; "
                              "report at the export's own T (omit --timesteps)")
    statistics, info = load_statistics(stats_file)
    ann = ann_from_export(folder)
    extra = {}
    outliers = tuple(options.get("outliers") or ())
    if outliers:
        # The export's weights already carry its outlier transforms: record them as applied so none is replayed.
        ann.ann2snn_transforms = list(outliers)
        extra["outliers"] = outliers
    snn = convert(ann, recipe=options.get("name", "qwen2"), timesteps=timesteps, coding=options.get("coding"),
                  threshold=threshold, headroom=headroom, range_steps=options.get("range_steps", 0), statistics=statistics,
                  calibration_info=info, seed=seed, progress=False, **extra)
    return place(snn, device_map)


def check_timesteps(folder: str | Path, timesteps: list[int]) -> None:
    """Refuse, before any work, a T the export's coding cannot hold."""
    from .export import read_snn_config
    from .recipes import get_recipe

    options = read_snn_config(Path(folder))["recipe"]
    recipe = get_recipe(options.get("name", "qwen2"))
    for t in timesteps:
        recipe.with_options(coding=options.get("coding"), timesteps=t, threshold=options.get("threshold"))


def build_reports(folder: str | Path, windows: torch.Tensor, timesteps: list[int] | None = None, *,
                  energy: EnergyModel | None = None, batch_size: int = 4, progress: bool = True,
                  model=None, device_map: str | None = None) -> dict:
    """Reports of the export in `folder` at each T (default: its own T), gathered for the writers.

    At the export's own T the export itself runs; any other T is the export
    converted again from its calibration statistics (`rebuild_at`). Models are
    placed by `device_map` (`ann2snn.placement`).
    """
    from . import load

    energy = energy or EnergyModel()
    model = model if model is not None else load(folder, device_map=device_map)
    own = model.ann2snn["recipe"]["timesteps"]
    timesteps = list(dict.fromkeys(timesteps or [own]))
    if timesteps != [own]:
        check_timesteps(folder, timesteps)
    runs = []
    for t in timesteps:
        snn = model if t == own else rebuild_at(folder, t, device_map=device_map)
        runs.append(build_report(snn, windows, energy=energy, batch_size=batch_size, progress=progress))
        if snn is not model:
            del snn
    return combine(runs, export=str(folder), primary=own if own in timesteps else timesteps[0], energy=energy)


def combine(runs: list[dict], *, export: str | None = None, primary: int | None = None,
            energy: EnergyModel | None = None) -> dict:
    """One report over several runs (one per T), as the writers take it."""
    from . import __version__

    energy = energy or EnergyModel()
    first = runs[0]
    return {
        "report_version": REPORT_VERSION, "ann2snn_version": __version__, "export": export,
        "recipe": first.get("recipe"), "coding": first.get("coding"),
        "windows": first["windows"], "seq_len": first["seq_len"], "tokens_processed": first["tokens_processed"],
        "tokens_scored": first["tokens_scored"],
        "primary_timesteps": primary if primary is not None else first["timesteps"],
        "energy_convention": energy.describe(), "conventions": CONVENTIONS,
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _as_report(report: dict) -> dict:
    return report if "runs" in report else combine([report])


def _primary(report: dict) -> dict:
    for run in report["runs"]:
        if run["timesteps"] == report["primary_timesteps"]:
            return run
    return report["runs"][0]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_json_safe(_as_report(report)), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def _n(value) -> str:
    return f"{int(value):,}"


def _f(value, digits=4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _energy(pj: float) -> str:
    for unit, scale in (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3f} {unit}"
    return f"{pj:.3f} pJ"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    report = _as_report(report)
    run = _primary(report)
    lines = [f"# ann2snn report{': ' + report['export'] if report.get('export') else ''}", ""]
    lines += [f"Recipe **{report['recipe']}**, {report['coding']} coding; {report['windows']} window(s) × "
              f"{report['seq_len']} tokens = {_n(report['tokens_processed'])} tokens processed, "
              f"{_n(report['tokens_scored'])} scored. ANN = the same weights with spiking off; SNN = step simulation "
              "(real spike trains).", ""]
    lines += ["## Summary", ""]
    rows = []
    for r in report["runs"]:
        e = r["energy"]
        rows.append([str(r["timesteps"]), str(r["levels"]), _f(r["ppl_ann"], 3), _f(r["ppl_snn"], 3),
                     _f(r["ppl_snn"] / r["ppl_ann"] if r["ppl_ann"] else float("nan")), _f(r["top1_agreement"]),
                     _f(r["totals"]["firing_rate"]), _energy(e["ann_pj_per_token"]), _energy(e["snn_pj_per_token"]),
                     _f(e["snn_over_ann"], 3)])
    lines += _table(["T", "levels", "PPL ANN", "PPL SNN", "PPL ratio", "top-1 agreement", "firing rate",
                     "ANN energy/token", "SNN energy/token", "SNN/ANN energy"], rows)
    conv = report["energy_convention"]
    lines += ["", "## Energy convention", "", f"`{conv['name']}`: {conv['text']}.", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["conventions"].items()]
    lines += ["", f"## Operations and energy at T={run['timesteps']}", ""]
    t, e = run["totals"], run["energy"]
    lines += _table(["quantity", "count", "energy"], [
        ["ANN: MACs of the spiking layers", _n(t["ann_mac"]), _energy(e["breakdown_pj"]["ann: spiking layers as MACs"])],
        ["SNN: spike-driven ACs", _n(t["snn_ac"]), _energy(e["breakdown_pj"]["snn: spike-driven ACs"])],
        ["SNN: shifts (weighted spikes)", _n(t["snn_shifts"]), _energy(e["breakdown_pj"]["snn: shifts of weighted spikes"])],
        ["SNN: spikes", _n(t["spikes"]), "—"],
        ["SNN: neuron updates", _n(t["neuron_updates"]), _energy(e["breakdown_pj"]["snn: neuron updates"])],
        ["SNN: spike encoding (float x/Δ)", _n(t["snn_encoding_flops"]), _energy(e["breakdown_pj"]["snn: spike encoding (float)"])],
        ["both: bias additions (AC)", _n(t["bias_adds"]), _energy(e["breakdown_pj"]["both: bias additions"])],
        ["both: float MACs", _n(t["float_mac"]), _energy(e["breakdown_pj"]["both: float MACs"])],
        ["both: float FLOPs", _n(t["float_flops"]), _energy(e["breakdown_pj"]["both: float FLOPs"])],
        ["**ANN total**", "", f"**{_energy(e['ann_pj'])}** ({_energy(e['ann_pj_per_token'])}/token)"],
        ["**SNN total**", "", f"**{_energy(e['snn_pj'])}** ({_energy(e['snn_pj_per_token'])}/token)"],
    ])
    s = e["spiking_layers_only"]
    lines += ["", f"Spiking layers alone: SNN {_energy(s['snn_pj'])} vs ANN {_energy(s['ann_pj'])} "
              f"(ratio {_f(s['snn_over_ann'], 3)}).", ""]
    lines += ["### Float bucket (stays floating point in both models)", ""]
    fo = run["float_operations"]
    rows = [[k, "MAC", _n(v), ""] for k, v in fo["mac"].items()]
    rows += [[k, "FLOP", _n(v), fo["costs"].get(k, "")] for k, v in fo["flops"].items()]
    lines += _table(["operation", "unit", "count", "cost per element"], rows)
    lines += ["", f"## Per layer at T={run['timesteps']}", ""]
    lines += _table(["layer", "firing rate", "spikes", "SNN ACs", "shifts", "ANN MACs", "AC/MAC", "float FLOPs",
                     "cos(ANN, SNN)"],
                    [[str(r["layer"]), _f(r["firing_rate"]), _n(r["spikes"]), _n(r["ac"]), _n(r["shifts"]),
                      _n(r["ann_mac"]), _f(r["ac"] / r["ann_mac"] if r["ann_mac"] else float("nan"), 3),
                      _n(r["float_flops"]), _f(r["cosine_similarity"], 5)] for r in run["layers"]])
    lines += ["", f"## Per spiking module at T={run['timesteps']}", ""]
    rows = []
    modules = run["modules"]
    inputs = {m["input_neuron"] for m in modules.values() if m["kind"] == "synapsis"}
    for name, m in modules.items():
        if m["kind"] == "synapsis":
            neuron = modules.get(m["input_neuron"], {})
            rows.append([f"`{name}`", f"synapsis {m['in_features']}→{m['out_features']}",
                         _f(neuron.get("firing_rate")), _n(neuron.get("spikes", 0)), _n(m["ac"]), _n(m["shifts"]),
                         _n(m["ann_mac"])])
        elif m["kind"] == "neuron" and name not in inputs:
            rows.append([f"`{name}`", "neuron", _f(m["firing_rate"]), _n(m["spikes"]), "", "", ""])
        elif m["kind"] == "snn_matmul":
            rows.append([f"`{name}`", "SNNMatmul", "", "", _n(m["ac"]), _n(m["shifts"]), _n(m["ann_mac"])])
    lines += ["A Synapsis row shows its input neuron's firing rate and spikes (`<name>.neuron` in report.json).", ""]
    lines += _table(["module", "kind", "firing rate", "spikes", "SNN ACs", "shifts", "ANN MACs"], rows)
    if plots is not None:
        lines += ["", "## Plots", ""]
        if plots:
            lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        else:
            lines += ["(matplotlib is not installed: no plots; `pip install 'ann2snn[report]'`)"]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str | Path, plots: list[str] | None = None) -> Path:
    path = Path(path)
    path.write_text(render_markdown(report, plots), encoding="utf-8")
    return path


def write_plots(report: dict, folder: str | Path) -> list[Path]:
    """firing_rate.png, cosine_similarity.png and (several T) perplexity_vs_T.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return []
    report = _as_report(report)
    folder = Path(folder)
    written = []

    def per_layer(key, ylabel, title, file):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in report["runs"]:
            xs = [r["layer"] for r in run["layers"]]
            ax.plot(xs, [r[key] if r[key] is not None else float("nan") for r in run["layers"]], marker="o",
                    label=f"T={run['timesteps']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / file, dpi=100)
        plt.close(fig)
        written.append(folder / file)

    per_layer("firing_rate", "nonzero spikes per neuron per step", "Firing rate per layer", "firing_rate.png")
    per_layer("cosine_similarity", "cosine similarity", "ANN vs SNN hidden states per layer", "cosine_similarity.png")
    if len(report["runs"]) > 1:
        runs = sorted(report["runs"], key=lambda r: r["timesteps"])
        fig, ax = plt.subplots(figsize=(7, 4))
        xs, ys = [r["timesteps"] for r in runs], [r["ppl_snn"] for r in runs]
        ax.plot(xs, ys, marker="o", label="SNN")
        ax.axhline(runs[0]["ppl_ann"], color="gray", linestyle="--", label="ANN (same weights)")
        ax.set_xticks(xs)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("perplexity")
        finite = [y for y in ys + [runs[0]["ppl_ann"]] if y is not None and math.isfinite(y) and y > 0]
        if finite and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_title(f"Perplexity vs T ({report['coding']} coding)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "perplexity_vs_T.png", dpi=100)
        plt.close(fig)
        written.append(folder / "perplexity_vs_T.png")
    return written


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, list[Path]]:
    """report.json, report.md and the plots into `out_dir`, atomically (a hidden sibling renamed into place).

    Refuses an existing `out_dir`. Returns (out_dir, plots written).
    """
    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"report folder {out} already exists; choose another --out")
    with atomic_folder(out, ConfigError) as tmp:
        plots = write_plots(report, tmp)
        write_json(report, tmp / "report.json")
        write_markdown(report, tmp / "report.md", [p.name for p in plots])
    return out, [out / p.name for p in plots]
