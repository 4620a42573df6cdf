"""spikingjelly 2.0's Qwen2 recipe counted by ann2snn's report counter and priced by its energy model.

What the recipe (`spikingjelly.activation_based.ann2snn.recipes.qwen2`, the
default ``signed_if`` encoding) runs, per decoder layer, on [T, B, S, ·]
sequences (T = time steps; a "TD" operator keeps running sums of its inputs,
applies the ANN operation to them at every step and emits the step-to-step
difference of its output):

- the embedding is encoded once into signed spikes (`SignedQCFSSequenceEncoder`:
  two `ActivationAwareIFNode`s per value, one for each sign, rate coding with
  at most one spike per neuron per step; the spikes sum to round(x/Δ) clamped
  to ±T, so 2T+1 levels);
- input_layernorm: `TDRMSNorm`, an RMSNorm of the running sum at every step
  (float: its output differences are dense floats, not spikes);
- q_proj, k_proj, v_proj: `TDLinear` fed those float differences: a float
  matmul at every step (it runs F.linear on the running sum and differences
  the result; a Linear on the differences is the same, bias once at step 0);
- RoPE on the float q and k differences, at every step;
- q, k and v are summed over the T steps and re-encoded into signed spikes
  (three encoders, the "query", "key", "value" sites);
- `TDScaledDotProductAttention` on those spike trains: at every step the full
  SDPA of the running sums Q_≤t, K_≤t, V_≤t. QKᵀ has two spike operands, so
  it can be evaluated from the spikes as ann2snn's SNNMatmul is
  (Σ_t Q_≤t k_tᵀ + q_t K_<tᵀ: ACs); the softmax then runs at every step on
  the running scores (float), and P_t·V_≤t is a float matmul at every step
  (P_t is a float probability that changes with t);
- o_proj: `TDLinear` on the attention output's float differences, every step;
- the residual addition and post_attention_layernorm (`TDRMSNorm`) every step;
- gate_proj, up_proj: `TDLinear` on float differences, every step; `TDSiLU`
  and the product gate ⊙ up (`SNNElementWiseProduct`) on running sums, every step;
- the product is summed over T and re-encoded into signed spikes ("mlp" site);
- down_proj: `TDLinear` fed those spikes — the one spike-driven Linear;
- the final norm (`TDRMSNorm`, every step), then lm_head once, a float matmul
  on the hidden state summed over the T steps.

So spikes reach two products per layer: down_proj and QKᵀ. Everything else
runs in float, most of it once per step.

How it is counted (ann2snn's conventions, `ann2snn.report.counting`, applied
to what each operator receives):

- down_proj: `synapsis_counts` of its input spikes (one AC per spike per
  output; rate code, so no shifts);
- QKᵀ: `matmul_counts` of the q and k spike trains on the causal mask (key
  heads counted once per group, as ann2snn's grouped-query products); each v
  spike adds into V's running sum (1 AC);
- neurons: two IF neurons per encoded value, each updated at every step
  (2·T updates per value; ann2snn's signed neuron is one neuron, T updates);
  their spikes are the non-zero entries of the encoded trains;
- float matmuls as MACs at every step they run: q/k/v/o/gate/up by the
  non-zero entries of their input differences (a zero difference costs
  nothing, which favours the recipe), P·V on its causal support, lm_head once;
- float FLOPs with ann2snn's per-element costs (`ann2snn.report.floats`) at
  every step they run: RMSNorm, RoPE, attention scaling and softmax, SiLU,
  gate ⊙ up, residual additions; plus what the TD form adds: one add per
  element per step for each running sum of a non-linear TD operator (RMSNorm,
  SiLU, the product, and the sums that feed the encoders) and one per output
  element per step for its difference;
- spike encoding: one float op per encoded value (x/Δ), as ann2snn's.

Each float figure is also kept as "once": what the same float stages would
cost run once on the summed values (the recipe's ``exact_td`` mode shows the
result is the same; spikes and neuron updates unchanged). That is a schedule
the recipe does not run, reported as its lower bound.

spikingjelly's own SynOp/AC counters recognise a spike as a value in {0, 1};
this recipe's spikes are ±Δ per channel and reach down_proj as such, so they
see float matmuls only. Cross-checked in tests/test_energy_spikingjelly.py:
given the same spikes as {0, 1} tensors, its SynOpCounter counts down_proj's
ACs as `synapsis_counts` does; its MACCounter sees q_proj run F.linear at
every step (T × the dense MACs, the bound of the count here); the spikes
counted equal the encoders' own statistics.

Memory (view iii) as ann2snn's `memory_traffic`: the weights each MAC / AC
reads (on chip), or each Linear's weights fetched once per step it runs
(streamed), plus the spikes at the encoded sites; the recipe's float
activations moved at every step are left out (in its favour).
"""

from __future__ import annotations

import math

import torch

from ann2snn.modules.neuron import SpikeTrain
from ann2snn.report.counting import matmul_counts, neuron_counts, operand_bits, synapsis_counts
from ann2snn.report.energy import EnergyModel, IntegerModel, MemoryModel
from ann2snn.report.floats import flops, visible_scores

FLOAT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
NEURONS_PER_VALUE = 2  # one ActivationAwareIFNode per sign


def _train(x: torch.Tensor) -> SpikeTrain:
    """A rate-coded train of the recipe's spikes ±Δ (the trains' Δ does not enter the counts)."""
    steps = x.shape[0]
    return SpikeTrain(torch.sign(x), torch.ones(steps), torch.ones(()))


class SpikingjellyCounts:
    """Operation counts of one `Qwen2SNNModel` over the batches run while `hooks` are attached.

    `counts[key]` holds integers: spike-driven figures ("spikes", "neuron_updates",
    "encodings", "ac" with down_proj's share "synapsis_ac", "bias_adds", and
    "spiking_weights": down_proj's weights, once per pass), the ANN's MACs of the
    spike-driven sites ("site_mac": down_proj and the causal QKᵀ, with their
    operand bits in `site_mac_by_bits`), and float figures in two schedules
    ("float_X" as run, "float_X_once" once on the sums): "mac", "flops", the
    weights those MACs read ("weight_reads") and the weights fetched per pass
    ("weights": once per step a Linear runs).
    """

    def __init__(self, model):
        self.model = model
        self.timesteps = model.time_steps
        self.counts: dict[str, int] = {}
        self.site_mac_by_bits: dict[tuple, int] = {}

    def add(self, **values: int) -> None:
        for key, value in values.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)

    def add_float(self, kind: str, as_run: int, once: int) -> None:
        self.add(**{f"float_{kind}": as_run, f"float_{kind}_once": once})

    def _neurons(self, x: torch.Tensor) -> None:
        counts = neuron_counts(_train(x))
        self.add(spikes=counts["spikes"], neuron_updates=NEURONS_PER_VALUE * counts["neuron_updates"],
                 encodings=counts["encodings"])

    def _encoder_sum(self, x: torch.Tensor) -> None:
        """The recipe sums a float TD sequence over T before encoding it: T−1 adds per value."""
        self.add_float("flops", (x.shape[0] - 1) * x[0].numel(), 0)

    def hooks(self) -> list:
        model, handles = self.model, []
        handles.append(model.layers[0].register_forward_pre_hook(lambda m, args: self._neurons(args[0])))
        for layer in model.layers:
            handles.append(layer.register_forward_hook(self._residual))
            for name in FLOAT_LINEARS:
                handles.append(getattr(layer, name).register_forward_pre_hook(self._float_linear))
            handles.append(layer.down_proj.register_forward_pre_hook(self._down_proj))
            handles.append(layer.sdpa.register_forward_pre_hook(self._attention))
            handles.append(layer.act.register_forward_pre_hook(lambda m, args: self._td_elementwise("silu", args, 1)))
            handles.append(layer.product.register_forward_pre_hook(lambda m, args: self._td_elementwise("gate * up", args, 2)))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                handles.append(norm.register_forward_pre_hook(self._rmsnorm))
        handles.append(model.norm.register_forward_pre_hook(self._rmsnorm))
        handles.append(model.norm.register_forward_hook(self._head))
        return handles

    # ------------------------------------------------------------------ spike-driven

    def _down_proj(self, module, args) -> None:
        x = args[0]  # the "mlp" encoder's spikes, [T, B, S, I]
        self._neurons(x)
        self._encoder_sum(x)  # the product's TD sequence was summed before encoding (same shape)
        train = _train(x)
        counts = synapsis_counts(train, module.weight, module.bias)
        rows = x[0].numel() // x.shape[-1]
        mac = rows * module.in_features * module.out_features
        self.add(ac=counts["ac"], synapsis_ac=counts["ac"], bias_adds=counts["bias_adds"], site_mac=mac,
                 spiking_weights=module.weight.numel())
        self._site_bits((operand_bits(train), None), mac)

    def _attention(self, module, args) -> None:
        query, key, value, mask = args[:4]  # spikes [T, B, heads, S, d]; key and value repeated per group
        kv_heads = self.model.layers[0].kv_heads
        groups = query.shape[2] // kv_heads
        key, value = key[:, :, ::groups], value[:, :, ::groups]  # the kv heads the encoders fired
        for x in (query, key, value):
            self._neurons(x)
            self._encoder_sum(x)
        q_train, k_train = _train(query), _train(key.transpose(-1, -2))
        qk = matmul_counts(q_train, k_train, wanted=mask)
        self.add(ac=qk["ac"], site_mac=qk["causal_mac"])
        self._site_bits((operand_bits(q_train), operand_bits(k_train)), qk["causal_mac"])
        # Each v spike enters V's running sum (1 AC); P_t · V_≤t is a float matmul at every step.
        self.add(ac=int(value.ne(0).sum()))
        steps, batch, heads, length, dim = query.shape
        scores = visible_scores(mask, batch, heads, length, key.shape[-2])
        pv = scores * dim
        self.add_float("mac", steps * pv, pv)
        per_step = (flops("attention scaling", visible_score=scores)
                    + flops("softmax", visible_score=scores, output_element=batch * heads * length * dim))
        rope = flops("rope", element_of_q_and_k=batch * length * dim * (heads + key.shape[2]))
        self.add_float("flops", steps * (per_step + rope), per_step + rope)
        self.add_float("flops", steps * batch * heads * length * dim, 0)  # the output's difference

    def _site_bits(self, bits: tuple, mac: int) -> None:
        self.site_mac_by_bits[bits] = self.site_mac_by_bits.get(bits, 0) + mac

    # ------------------------------------------------------------------ float

    def _float_linear(self, module, args) -> None:
        x = args[0]  # float differences, [T, B, S, in]
        rows = x[0].numel() // x.shape[-1]
        for kind in ("mac", "weight_reads"):  # every float MAC of a Linear reads its weight
            self.add_float(kind, int(x.ne(0).sum()) * module.out_features, rows * module.in_features * module.out_features)
        self.add_float("weights", x.shape[0] * module.weight.numel(), module.weight.numel())
        if module.bias is not None:
            self.add(bias_adds=rows * module.out_features)

    def _rmsnorm(self, module, args) -> None:
        x = args[0]
        steps, per_step = x.shape[0], x[0].numel()
        once = flops("rmsnorm", element=per_step, row=per_step // x.shape[-1])
        self.add_float("flops", steps * once + 2 * steps * per_step, once)  # + running sum and difference

    def _td_elementwise(self, kind: str, args, inputs: int) -> None:
        x = args[0]
        steps, per_step = x.shape[0], x[0].numel()
        once = flops(kind, **{"element" if kind == "silu" else "intermediate_element": per_step})
        self.add_float("flops", steps * once + (inputs + 1) * steps * per_step, once)

    def _residual(self, module, args, out) -> None:
        hidden = out
        steps, per_step = hidden.shape[0], hidden[0].numel()
        once = flops("residual additions", hidden_element_per_decoder_layer=per_step)
        self.add_float("flops", steps * once, once)

    def _head(self, module, args, out) -> None:
        """lm_head once, on the final norm's output summed over T (a float matmul, not a module call)."""
        head = self.model.lm_head
        rows = out[0].numel() // out.shape[-1]
        for kind in ("mac", "weight_reads"):
            self.add_float(kind, rows * head.in_features * head.out_features, rows * head.in_features * head.out_features)
        self.add_float("flops", (out.shape[0] - 1) * out[0].numel(), 0)  # the sum over T
        self.add_float("weights", head.weight.numel(), head.weight.numel())


# ---------------------------------------------------------------------- energy


def energy_views(counts: SpikingjellyCounts, tokens: int, ann_run: dict, schedule: str,
                 energy: EnergyModel | None = None, integer: IntegerModel | None = None,
                 memory: MemoryModel | None = None) -> dict:
    """The recipe's SNN/ANN energy per token in ann2snn's views (i), (ii), (iii).

    `counts` were gathered over `tokens` tokens; the ANN is that of `ann_run`, an
    `ann2snn.report.build_report` run over windows of the same length (so its
    per-token figures hold for these tokens too: checked on the MACs).
    schedule: "as run" (the float stages at every step) or "once" (once, on the summed values).
    """
    energy, integer, memory = energy or EnergyModel(), integer or IntegerModel(), memory or MemoryModel()
    c = {key: value / tokens for key, value in counts.counts.items()}  # per token
    ann_tokens = ann_run["tokens_processed"]
    ann_totals = {key: value / ann_tokens for key, value in ann_run["totals"].items() if isinstance(value, (int, float))}
    ann_mac = ann_totals["ann_mac"] + ann_totals["float_mac"]
    if not math.isclose(c["float_mac_once"] + c["site_mac"], ann_mac, rel_tol=1e-6):
        raise ValueError(f"the recipe's MACs run once ({c['float_mac_once'] + c['site_mac']:.0f} per token) are not the "
                         f"ANN's ({ann_mac:.0f}): the windows or the model differ")
    once = schedule == "once"
    float_mac = c["float_mac_once" if once else "float_mac"]
    float_flops = c["float_flops_once" if once else "float_flops"] + c["encodings"]  # + x/Δ per encoded value
    float_weights = c["float_weights_once" if once else "float_weights"]
    float_weight_reads = c["float_weight_reads_once" if once else "float_weight_reads"]

    # (i): 45 nm fp32 operations, as energy_estimate.
    spiking = c["ac"] * energy.e_ac_pj + c["neuron_updates"] * energy.neuron
    snn_i = spiking + float_mac * energy.e_mac_pj + float_flops * energy.float_op + c["bias_adds"] * energy.e_ac_pj
    ann_i = ann_run["energy"]["ann_pj_per_token"]
    # (ii): an integer ANN with the recipe's levels on the sites it spikes (down_proj, QKᵀ), as integer_estimate;
    # everything else as in (i), in both models.
    site_int = sum(mac * integer.mac(a, b) for (a, b), mac in counts.site_mac_by_bits.items()) / tokens
    ann_ii = (ann_i - c["site_mac"] * energy.e_mac_pj + site_int
              + ann_totals["bias_adds"] * (integer.add - energy.e_ac_pj) + c["encodings"] * energy.float_op)
    snn_ii = (c["ac"] * integer.add + c["neuron_updates"] * integer.neuron + float_mac * energy.e_mac_pj
              + float_flops * energy.float_op + c["bias_adds"] * integer.add)
    # (iii): (i) plus weights and the spiking sites' activations moved, in memory_traffic's two dataflows.
    # The recipe's float activations moved at every step are left out (in its favour).
    spikes_bytes = c["neuron_updates"] / NEURONS_PER_VALUE * memory.spike_bits / 8
    weights = {"stationary": (c["synapsis_ac"] + float_weight_reads) * memory.weight_bytes * memory.e_sram_pj_per_byte,
               "streamed": (c["spiking_weights"] * counts.timesteps + float_weights) * memory.weight_bytes
               * memory.e_dram_pj_per_byte}
    iii = {flow: (pj + spikes_bytes * memory.e_sram_pj_per_byte + snn_i)
           / ann_run["memory"][flow]["ann"]["total_pj_per_token"] for flow, pj in weights.items()}
    return {
        "schedule": schedule,
        "i": snn_i / ann_i,
        "ii": snn_ii / ann_ii,
        "iii_stationary": iii["stationary"],
        "iii_streamed": iii["streamed"],
        "i_spiking_sites": spiking / (c["site_mac"] * energy.e_mac_pj),
        "snn_pj_per_token": snn_i,
        "firing_rate": c["spikes"] / (c["neuron_updates"] / NEURONS_PER_VALUE),
    }
