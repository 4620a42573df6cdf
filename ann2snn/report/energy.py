"""Energy from the operation counts, three ways, each convention written into the report.

(i)   The field's convention: 45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014; spikingjelly's
      `SimpleEnergyCostConfig.fp32()`): a MAC 4.6 pJ, an AC 0.9 pJ; shifts, neuron updates and the
      float operations both models keep are charged too. `runs[i].energy` (`snn_over_ann`).
(ii)  Against an integer-activation ANN with as many levels as the SNN's neurons (b = ⌈log2 levels⌉
      bits per activation, per module), the fair baseline for a quantisation-equivalent SNN: both
      models use `weight_bits` integer weights and `accumulator_bits` integer accumulators; the float
      operations cost as in (i). `runs[i].energy_integer`.
(iii) Memory traffic: bytes of weights and activations moved per token under two dataflows, priced
      per byte, added to (i). `runs[i].memory`.

Every constant is a field of a frozen dataclass (and a CLI option of `ann2snn report`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm, 0.9 V (pJ per operation); the memory
# figures per 32-bit word as tabulated from it by Han et al., "Learning both weights and connections",
# NeurIPS 2015, Table 1. The fp32 MAC is spikingjelly's SimpleEnergyCostConfig.fp32() (mult 3.7 + add 0.9).
HOROWITZ_45NM = {
    "fp32_mac": 4.6, "fp32_add": 0.9, "fp32_mult": 3.7,
    "int8_add": 0.03, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "sram_32bit_word": 5.0, "dram_32bit_word": 640.0,
}
SOURCE = "Horowitz, ISSCC 2014 (45 nm, 0.9 V); memory per 32-bit word as in Han et al., NeurIPS 2015, Table 1"


def _check(obj) -> None:
    from ..errors import ConfigError

    for name, value in asdict(obj).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class EnergyModel:
    """View (i): energy per operation in pJ; defaults are the 45 nm fp32 convention."""

    e_mac_pj: float = HOROWITZ_45NM["fp32_mac"]
    e_ac_pj: float = HOROWITZ_45NM["fp32_add"]
    e_shift_pj: float | None = None  # None: E_AC (a shift costs at most an add)
    e_float_pj: float | None = None  # None: E_MAC (upper bound for an exp or a divide)
    e_neuron_pj: float | None = None  # None: 2·E_AC (a compare and a subtract per neuron per step)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def shift(self) -> float:
        return self.e_ac_pj if self.e_shift_pj is None else self.e_shift_pj

    @property
    def float_op(self) -> float:
        return self.e_mac_pj if self.e_float_pj is None else self.e_float_pj

    @property
    def neuron(self) -> float:
        return 2 * self.e_ac_pj if self.e_neuron_pj is None else self.e_neuron_pj

    def describe(self) -> dict:
        default = (self.e_mac_pj, self.e_ac_pj) == (HOROWITZ_45NM["fp32_mac"], HOROWITZ_45NM["fp32_add"])
        text = (("45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014; spikingjelly SimpleEnergyCostConfig.fp32): "
                 if default else "custom energies: ")
                + f"E_MAC = {self.e_mac_pj} pJ, E_AC = {self.e_ac_pj} pJ, E_shift = {self.shift} pJ"
                + (" (= E_AC)" if self.e_shift_pj is None else "")
                + f", float FLOP = {self.float_op} pJ" + (" (= E_MAC, upper bound)" if self.e_float_pj is None else "")
                + f", neuron update = {self.neuron} pJ" + (" (= 2·E_AC: compare, subtract)" if self.e_neuron_pj is None else "")
                + "; compute only (memory traffic: view iii)")
        return {"name": "45nm-horowitz2014-fp32" if default else "custom", "text": text,
                "e_mac_pj": self.e_mac_pj, "e_ac_pj": self.e_ac_pj, "e_shift_pj": self.shift,
                "e_float_pj": self.float_op, "e_neuron_pj": self.neuron}


@dataclass(frozen=True)
class IntegerModel:
    """View (ii): an integer datapath. A b-bit × w-bit multiply costs e_int8_mult_pj·b·w/64 (its partial-product
    array; Horowitz: 8×8 bits 0.2 pJ, 32×32 bits 3.1 pJ ≈ 0.2·16), an n-bit add e_int32_add_pj·n/32
    (Horowitz: 8 bits 0.03 pJ, 32 bits 0.1 pJ)."""

    weight_bits: int = 16
    accumulator_bits: int = 32
    e_int8_mult_pj: float = HOROWITZ_45NM["int8_mult"]
    e_int32_add_pj: float = HOROWITZ_45NM["int32_add"]
    e_shift_pj: float | None = None  # None: one accumulator add (a barrel shift, an upper bound)
    e_neuron_pj: float | None = None  # None: two accumulator adds (compare, subtract)

    def __post_init__(self) -> None:
        _check(self)
        from ..errors import ConfigError

        if not (isinstance(self.weight_bits, int) and isinstance(self.accumulator_bits, int)
                and 1 <= self.weight_bits <= 64 and 1 <= self.accumulator_bits <= 64):
            raise ConfigError("weight_bits and accumulator_bits must be integers from 1 to 64")

    def mult(self, a_bits: int, b_bits: int) -> float:
        return self.e_int8_mult_pj * a_bits * b_bits / 64

    @property
    def add(self) -> float:
        return self.e_int32_add_pj * self.accumulator_bits / 32

    @property
    def shift(self) -> float:
        return self.add if self.e_shift_pj is None else self.e_shift_pj

    @property
    def neuron(self) -> float:
        return 2 * self.add if self.e_neuron_pj is None else self.e_neuron_pj

    def mac(self, a_bits: int, b_bits: int | None) -> float:
        """A b_a-bit × b_b-bit (None: × weight) multiply and an accumulator add."""
        return self.mult(a_bits, self.weight_bits if b_bits is None else b_bits) + self.add

    def describe(self) -> dict:
        return {"name": "integer-ann-horowitz2014", "text": (
            f"integer ANN with b = ⌈log2 levels⌉-bit activations (per module, as the SNN's neurons), "
            f"{self.weight_bits}-bit weights, {self.accumulator_bits}-bit accumulators; b×w-bit multiply = "
            f"{self.e_int8_mult_pj} pJ·b·w/64 (array multiplier: Horowitz 8×8 bits 0.2 pJ, 32×32 bits 3.1 pJ), "
            f"add = {self.e_int32_add_pj} pJ·{self.accumulator_bits}/32 = {self.add:g} pJ (Horowitz 32-bit int add "
            f"0.1 pJ); SNN: AC = one add, shift = {self.shift:g} pJ, neuron update = {self.neuron:g} pJ; both models "
            "quantise the same activations (one float op each) and keep the same float operations at view (i) prices"),
            **asdict(self), "e_add_pj": self.add}


@dataclass(frozen=True)
class MemoryModel:
    """View (iii): bytes moved per token and their energy, under two dataflows (see `memory_traffic`)."""

    weight_bytes: float = 4.0  # fp32, as view (i)
    activation_bytes: float = 4.0  # a dense activation of the ANN
    spike_bits: float = 2.0  # a ternary spike, per neuron per step
    e_sram_pj_per_byte: float = HOROWITZ_45NM["sram_32bit_word"] / 4
    e_dram_pj_per_byte: float = HOROWITZ_45NM["dram_32bit_word"] / 4

    def __post_init__(self) -> None:
        _check(self)

    def describe(self) -> dict:
        return {"name": "memory-han2015-horowitz2014", "text": (
            f"weights {self.weight_bytes:g} B each, ANN activations {self.activation_bytes:g} B, SNN spikes "
            f"{self.spike_bits:g} bits per neuron per step; SRAM {self.e_sram_pj_per_byte:g} pJ/B, DRAM "
            f"{self.e_dram_pj_per_byte:g} pJ/B ({SOURCE}). Dataflow 'stationary': all weights held in on-chip SRAM, "
            "each MAC (ANN) or synaptic AC (SNN) reads its weight once; 'streamed': weights in DRAM, read once per "
            "forward pass (ANN, and the float layers of both) or once per time step of it (the SNN's spiking layers). "
            "Activations: the inputs of the spiking sites through SRAM (the rest moves alike in both models and is "
            "left out)"), **asdict(self)}


def energy_estimate(totals: dict, energy: EnergyModel, tokens: int) -> dict:
    """View (i): ANN and SNN energy in pJ from the operation totals."""
    float_common = totals["float_mac"] * energy.e_mac_pj + totals["float_flops"] * energy.float_op
    bias = totals["bias_adds"] * energy.e_ac_pj
    ann_spiking = totals["ann_mac"] * energy.e_mac_pj
    snn_spiking = (totals["snn_ac"] * energy.e_ac_pj + totals["snn_shifts"] * energy.shift
                   + totals["neuron_updates"] * energy.neuron)
    snn_encoding = totals["snn_encoding_flops"] * energy.float_op
    ann_total = ann_spiking + bias + float_common
    snn_total = snn_spiking + snn_encoding + bias + float_common
    return {
        "view": "i", "convention": energy.describe(),
        "ann_pj": ann_total, "snn_pj": snn_total,
        "ann_pj_per_token": ann_total / tokens, "snn_pj_per_token": snn_total / tokens,
        "snn_over_ann": _ratio(snn_total, ann_total),
        "breakdown_pj": {
            "ann: spiking layers as MACs": ann_spiking,
            "snn: spike-driven ACs": totals["snn_ac"] * energy.e_ac_pj,
            "snn: shifts of weighted steps": totals["snn_shifts"] * energy.shift,
            "snn: neuron updates": totals["neuron_updates"] * energy.neuron,
            "snn: spike encoding (float)": snn_encoding,
            "both: bias additions": bias,
            "both: float MACs": totals["float_mac"] * energy.e_mac_pj,
            "both: float FLOPs": totals["float_flops"] * energy.float_op,
        },
        "spiking_layers_only": {"ann_pj": ann_spiking, "snn_pj": snn_spiking,
                                "snn_over_ann": _ratio(snn_spiking, ann_spiking)},
    }


def integer_estimate(totals: dict, integer: IntegerModel, energy: EnergyModel, tokens: int) -> dict:
    """View (ii): the SNN against an integer ANN of the same levels; `totals["ann_mac_by_bits"]` is
    [{"activation_bits", "operand_bits" (None: a weight), "mac"}]."""
    ann_spiking = sum(g["mac"] * (integer.mac(g["activation_bits"], g["operand_bits"]) if g["activation_bits"]
                                  else energy.e_mac_pj)  # a layer that never received spikes: priced as a float MAC
                      for g in totals["ann_mac_by_bits"])
    snn_spiking = (totals["snn_ac"] * integer.add + totals["snn_shifts"] * integer.shift
                   + totals["neuron_updates"] * integer.neuron)
    quantise = totals["snn_encoding_flops"] * energy.float_op
    common = (totals["bias_adds"] * integer.add + totals["float_mac"] * energy.e_mac_pj
              + totals["float_flops"] * energy.float_op + quantise)
    ann_total, snn_total = ann_spiking + common, snn_spiking + common
    return {
        "view": "ii", "convention": integer.describe(),
        "ann_pj": ann_total, "snn_pj": snn_total,
        "ann_pj_per_token": ann_total / tokens, "snn_pj_per_token": snn_total / tokens,
        "snn_over_ann": _ratio(snn_total, ann_total),
        "spiking_layers_only": {"ann_pj": ann_spiking, "snn_pj": snn_spiking,
                                "snn_over_ann": _ratio(snn_spiking, ann_spiking)},
    }


def memory_traffic(totals: dict, memory: MemoryModel, compute: dict, tokens: int) -> dict:
    """View (iii): bytes per token of weights and activations, ANN and SNN, per dataflow, and the energy
    with the compute of `compute` (view i) added."""
    activations = {"ann": totals["neuron_inputs"] * memory.activation_bytes,
                   "snn": totals["neuron_updates"] * memory.spike_bits / 8}
    weight_reads = {  # stationary: one SRAM read per MAC / synaptic AC
        "ann": (totals["synapsis_mac"] + totals["float_mac"]) * memory.weight_bytes,
        "snn": (totals["synapsis_ac"] + totals["float_mac"]) * memory.weight_bytes,
    }
    streamed = {  # streamed: every weight from DRAM once per pass; the SNN's spiking weights once per step of their input's window
        "ann": (totals["spiking_weights"] + totals["float_weights"]) * totals["passes"] * memory.weight_bytes,
        "snn": (totals["spiking_weight_steps"] + totals["float_weights"]) * totals["passes"]
               * memory.weight_bytes,
    }
    dataflows = {}
    for flow, weights, price in (("stationary", weight_reads, memory.e_sram_pj_per_byte),
                                 ("streamed", streamed, memory.e_dram_pj_per_byte)):
        row = {}
        for model in ("ann", "snn"):
            memory_pj = weights[model] * price + activations[model] * memory.e_sram_pj_per_byte
            row[model] = {"weight_bytes_per_token": weights[model] / tokens,
                          "activation_bytes_per_token": activations[model] / tokens,
                          "memory_pj_per_token": memory_pj / tokens,
                          "total_pj_per_token": (memory_pj + compute[f"{model}_pj"]) / tokens}
        row["snn_over_ann"] = _ratio(row["snn"]["total_pj_per_token"], row["ann"]["total_pj_per_token"])
        row["memory_snn_over_ann"] = _ratio(row["snn"]["memory_pj_per_token"], row["ann"]["memory_pj_per_token"])
        dataflows[flow] = row
    return {"view": "iii", "convention": memory.describe(), "compute_view": "i", **dataflows}


CONVENTIONS = {
    "synapsis": "each input spike (±1) drives out_features ACs (Δ folded into the weights)",
    "snn_matmul": "Σ_t (A_≤t @ b_t + a_t @ B_<t): a spike of b adds a column of A_≤t into the wanted outputs of its "
                  "column, a spike of a adds a row of B_<t into its row's wanted outputs (none at t=0), each spike "
                  "enters its running sum once (1 AC); grouped-query heads: the group's query rows stacked against "
                  "one key/value head, whose running sum is kept once",
    "weighted_spikes": "a weighted step (w_t ≠ 1, phase code) costs one shift per output accumulator that received "
                       "any spike in it (Horner: acc ← 2·acc + Σ spikes·W), not one per synaptic event",
    "neurons": "one update (compare and subtract) per neuron per time step, charged at the neuron-update energy",
    "attention": "causal half in both models: scores of visible positions only, probabilities zero where masked, "
                 "no softmax neuron for a masked position",
    "attention_sink": "with the 'sink' option, a q spike adds a row of the sink's constant keys (one AC per sink "
                      "token) and a spike of the sink's probability a row of its constant values (one AC per head "
                      "dimension), counted on those neurons; the ANN has no sink",
    "float": "operations that stay float are counted in the float bucket for both models: matmuls as MACs, the rest "
             "as FLOPs priced at the float-FLOP energy",
    "ann": "dense matmuls: Linear layers by spikingjelly's MACCounter as executed; the attention products on their "
           "causal support",
    "bias": "bias additions: one add per output element, in both models",
}
