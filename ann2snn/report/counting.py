"""Counting the SNN's work as it is done: spikes, accumulates (AC), shifts and neuron updates per module call.

The counts are read from the spike trains themselves (`SpikeTrain`), in one
hook per call of a spiking module, matched by type (subclasses included):

- `SignedNeuron` (any neuron that returns a `SpikeTrain`): its spikes, and one
  membrane update (compare and subtract) per neuron input per time step.
- `SynapticWeights` fed a spike train: a spike (±1) of input i adds or subtracts
  column i of W·diag(Δ) into the out_features accumulators of its row: one AC
  per output. The step weight w_t (phase code: 2^(T−1−t)) is paid where the
  arithmetic pays it, as a shift of each output accumulator once per step in
  which its row received any spike (Horner: acc ← 2·acc + Σ spikes·W), not once
  per synaptic event. Steps weighing 1 need no shift.
- `SNNMatmul` fed two spike trains: Σ_t (A_≤t @ b_t + a_t @ B_<t) (see
  modules/attention.py). A spike of b at (k, n) adds column k of the running sum
  A_≤t into the outputs of column n; a spike of a at (m, k) adds row k of B_<t
  into the outputs of row m (none at t = 0: B_<0 is empty); each spike enters
  its own running sum once (1 AC; a spike's value is a constant ±w_t·Δ, no shift).
  Both terms of step t weigh w_t, so each output accumulator touched in a
  weighted step pays one shift. Grouped-query heads count as the product runs
  them: the group's query rows stacked against one key/value head. Two trains
  of unequal windows (per-site time steps, range steps) are counted in the
  longer window, the shorter one's added steps silent in front, as the product
  runs them.

Attention is charged its causal half, in both models: `SpikingAttention`'s mask
restricts which scores QKᵀ computes, which probabilities can be non-zero (the
first operand of P·V) and which softmax neurons exist. The ANN's MACs of the
same products (`causal_mac`) are counted from the same masks.

Why spikingjelly's own SynOp/AC/MAC counters are not used on the SNN pass:
they intercept aten matmuls and recognise a spike tensor only as values in
{0, 1}. ann2snn's spikes are ternary, weighted per step, travel as
`SpikeTrain` objects whose Δ is folded into the weights before the matmul, and
the telescoped product multiplies accumulated (non-binary) values by one
step's spikes: those counters would see float matmuls. So the counts come from
`ModuleCounter`s (run by spikingjelly's `ModuleCounterMode`, which sums them
per module scope) that read the actual spike tensors.
"""

from __future__ import annotations

import math

import torch
from spikingjelly.activation_based.op_counter import ModuleCounter

from ..modules.attention import SNNMatmul, SpikingAttention, group_heads, head_groups
from ..modules.neuron import SignedNeuron, SpikeTrain
from ..modules.synapsis import SynapticWeights

SNN_FIELDS = ("spikes", "positive_spikes", "weighted_spikes", "neuron_inputs", "neuron_updates", "encodings",
              "ac", "shifts", "bias_adds", "causal_mac")


def operand_bits(train: SpikeTrain) -> int:
    """b = ⌈log2 levels⌉: the bits an integer activation needs for the levels this train can carry."""
    max_count = float(train.weights.abs().sum())
    return max(1, math.ceil(math.log2(2 * max_count + 1)))


def _shifted(weights: torch.Tensor) -> torch.Tensor:
    """Steps whose spikes weigh w_t ≠ 1: the accumulators they reach need a shift."""
    return weights.cpu() != 1


def neuron_counts(train: SpikeTrain, present: torch.Tensor | None = None) -> dict:
    """Spikes and membrane updates of one neuron layer's output train.

    `present` (bool, broadcastable to one step's shape): the neurons that exist
    (attention's softmax neurons of masked positions do not); default all.
    """
    spikes = train.spikes.ne(0)
    inputs = train.spikes[0].numel() if present is None else int(torch.broadcast_to(present, spikes.shape[1:]).sum())
    per_step = spikes.reshape(spikes.shape[0], -1).sum(1).cpu()
    return {
        "spikes": int(per_step.sum()),
        "positive_spikes": int((train.spikes > 0).sum()),
        "weighted_spikes": int(per_step[_shifted(train.weights)].sum()),
        "neuron_inputs": inputs,
        "neuron_updates": inputs * train.timesteps,
        "encodings": inputs,
    }


def synapsis_counts(train: SpikeTrain, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """ACs, shifts and bias additions of synaptic weights driven by `train` (spikes [T, ..., in_features])."""
    out_features = weight.shape[0]
    spikes = train.spikes.reshape(train.timesteps, -1, train.spikes.shape[-1]).ne(0)  # [T, rows, in]
    rows = spikes.shape[1]
    rows_with_spikes = spikes.any(-1).sum(1).cpu()  # [T]
    return {
        "ac": int(spikes.sum()) * out_features,
        "shifts": int(rows_with_spikes[_shifted(train.weights)].sum()) * out_features,
        "bias_adds": rows * out_features if bias is not None else 0,
    }


def matmul_counts(a: SpikeTrain, b: SpikeTrain, wanted: torch.Tensor | None = None,
                  a_support: torch.Tensor | None = None) -> dict:
    """ACs, shifts and the dense product's MACs of snn_matmul(a, b); a [T, ..., M, K], b [T, ..., K, N].

    `wanted` (bool, broadcastable to the output [..., M, N]): the outputs computed
    (causal scores); `a_support` (bool, broadcastable to a's [..., M, K]): where a
    can be non-zero (causal probabilities). None: all.
    """
    steps = max(a.timesteps, b.timesteps)  # trains of unequal windows run in the longer one, as snn_matmul runs them
    a, b = a.widened(steps), b.widened(steps)
    groups = head_groups(a.spikes.shape[1:], b.spikes.shape[1:])
    a_spikes, b_spikes = a.spikes.ne(0), b.spikes.ne(0)
    m, k, n = a_spikes.shape[-2], a_spikes.shape[-1], b_spikes.shape[-1]
    wanted = _grouped_mask(wanted, a_spikes.shape[1:-2] + (m, n), groups)
    a_support = _grouped_mask(a_support, a_spikes.shape[1:-2] + (m, k), groups)
    if groups > 1:
        a_spikes = group_heads(a_spikes, groups)
        m = a_spikes.shape[-2]
    batch = torch.broadcast_shapes(a_spikes.shape[1:-2], b_spikes.shape[1:-2])
    full = lambda x, shape: torch.broadcast_to(x, batch + shape)  # noqa: E731
    ones_mn = torch.ones((), dtype=torch.bool, device=a_spikes.device)
    wanted = full(ones_mn if wanted is None else wanted, (m, n)).float()
    support = full(ones_mn if a_support is None else a_support, (m, k)).float()
    # A spike of b at (k, n) reaches the outputs (m, n) that are wanted and where A[m, k] can be non-zero.
    reach_b = support.transpose(-1, -2) @ wanted  # [batch, k, n]: rows m per b spike
    reach_a = wanted.sum(-1, keepdim=True)  # [batch, m, 1]: columns n per a spike
    b_per_kn = full(b_spikes.sum(0).float(), (k, n))
    a_per_mk = full(a_spikes[1:].sum(0).float(), (m, k))
    ac = int((b_per_kn * reach_b).sum() + (a_per_mk * reach_a).sum()) + int(a_spikes.sum()) + int(b_spikes.sum())
    shifts = 0
    shifted = _shifted(a.weights).tolist()
    for t in range(a_spikes.shape[0]):
        if not shifted[t]:
            continue
        touched = (support @ full(b_spikes[t].float(), (k, n))) > 0  # outputs a b spike reaches at step t
        if t > 0:
            touched |= full(a_spikes[t].any(-1, keepdim=True), (m, 1))  # rows an a spike reaches
        shifts += int((touched & (wanted > 0)).sum())
    causal_mac = int((wanted * support.sum(-1, keepdim=True)).sum())  # the dense product's MACs on the same support
    return {"ac": ac, "shifts": shifts, "causal_mac": causal_mac}


def _grouped_mask(mask: torch.Tensor | None, shape: tuple, groups: int) -> torch.Tensor | None:
    """A mask broadcast to a's head layout, stacked by query-head group as snn_matmul stacks a."""
    if mask is None:
        return None
    mask = torch.broadcast_to(mask.to(torch.bool), shape)
    return group_heads(mask, groups) if groups > 1 else mask


class CountCache:
    """Computes a module call's counts once for all the counters that read it (they share the hook call).

    `roles` holds, per module of a `SpikingAttention`, what of the attention
    applies to it (set by `watch_attention` before the attention runs): the
    causal mask as the outputs QKᵀ computes ("wanted"), the probabilities P·V
    reads ("a_support") or the softmax neurons that exist ("present"), and the
    attention sink's constant products its spikes drive ("sink_keys",
    "sink_values": the sink's token count, and the head dimension).
    """

    def __init__(self):
        self._last = None
        self.roles: dict[torch.nn.Module, dict] = {}
        self.operand_bits: dict[torch.nn.Module, tuple[int, int | None]] = {}

    def get(self, module, args, out) -> dict:
        key = (module, args[0] if args else None, out)
        if self._last is not None and all(x is y for x, y in zip(self._last[0], key)):
            return self._last[1]
        roles = self.roles.get(module, {})
        counts = {}
        if isinstance(module, SignedNeuron) and isinstance(out, SpikeTrain):
            present = roles.get("present")
            counts = neuron_counts(out, None if present is None else _left_padded(present, out.spikes.shape[-1]))
            counts.update(_sink_products(out, roles))
        elif isinstance(module, SynapticWeights) and args and isinstance(args[0], SpikeTrain):
            counts = synapsis_counts(args[0], module.weight, module.bias)
            self.operand_bits[module] = (operand_bits(args[0]), None)
        elif isinstance(module, SNNMatmul) and len(args) == 2 and all(isinstance(x, SpikeTrain) for x in args):
            counts = matmul_counts(*args, wanted=roles.get("wanted"), a_support=roles.get("a_support"))
            self.operand_bits[module] = (operand_bits(args[0]), operand_bits(args[1]))
        self._last = (key, counts)
        return counts

    def clear(self) -> None:
        self._last = None

    def watch_attention(self, model) -> list:
        """Hooks giving each SpikingAttention's mask to its products and softmax neurons; returns the handles."""

        def remember(attention, args):
            mask = args[3] if len(args) > 3 else None
            sink = attention.sink_tokens if attention.simulation != "ann" else 0
            head_dim = args[0].shape[-1]
            self.roles[attention.qk] = {"wanted": mask}  # the scores computed: the visible ones
            self.roles[attention.pv] = {"a_support": mask}  # the probabilities: zero where masked
            self.roles[attention.softmax.neuron] = {"present": mask, "sink_values": (sink, head_dim)}
            self.roles[attention.q_neuron] = {"sink_keys": sink}  # each q spike selects a row of the sink's keys

        return [m.register_forward_pre_hook(remember) for m in model.modules() if isinstance(m, SpikingAttention)]


def _sink_products(train: SpikeTrain, roles: dict) -> dict:
    """ACs and shifts of the attention sink's constant products that `train`'s spikes drive, as a Synapsis's:
    a q spike adds a row of the sink's keys (one AC per sink token); a spike of the sink's probability
    adds a row of its values (one AC per head dimension)."""
    keys = roles.get("sink_keys", 0)
    values, head_dim = roles.get("sink_values", (0, 0))
    if keys:
        return synapsis_counts(train, torch.empty(keys, 0), None)
    if values:
        sink = SpikeTrain(train.spikes[..., :values], train.weights, train.delta)
        return synapsis_counts(sink, torch.empty(head_dim, 0), None)
    return {}


def _left_padded(mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """The mask with always-present columns in front up to `width` (the attention sink's keys)."""
    if mask is None:
        return None
    extra = width - mask.shape[-1]
    return mask if extra <= 0 else torch.cat([mask.new_ones(mask.shape[:-1] + (extra,)), mask], -1)


class SpikeFieldCounter(ModuleCounter):
    """A spikingjelly ModuleCounter reading one field of the spike counts per module call."""

    def __init__(self, field: str, cache: CountCache):
        super().__init__()
        self.field = field
        rule = lambda module, args, kwargs, out: cache.get(module, args, out).get(field, 0)  # noqa: E731
        self.rules = {("forward", cls): rule for cls in (SignedNeuron, SynapticWeights, SNNMatmul)}
