"""Importance-aware mixed precision: choose a bit-width per unit (expert or layer) under a byte budget.

Objective (a multiple-choice knapsack). Unit u has importance w_u >= 0 and a cost c_u(b) in bytes for
each candidate width b. Choose one width b_u per unit to

    maximise  sum_u w_u * b_u        subject to  sum_u c_u(b_u) <= budget_bytes

i.e. the importance-weighted precision. The budget is a hard constraint: the result never exceeds it.
Solved by dynamic programming over costs rounded *up* to `resolution` buckets (so every solution the
DP accepts is feasible with the true costs), compared with a greedy fill by importance per extra byte;
the better feasible answer is returned. Exact whenever the costs are multiples of the bucket size.

`quantize_mixed` applies an allocation over MoE layers: a layer's fused expert tensors become torchao
float8 (8 bits + one float32 scale per output row) or stay dense. One width per fused tensor is the
finest mix that stock transformers reloads (see docs/quantization.md). `quantize_mixed_packed` applies one
over int widths (4 / 8 / dense) stored as compressed-tensors pack-quantized config groups per MoE layer, which
vLLM resolves layer by layer and transformers cannot load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeprune.errors import MoePruneError

__all__ = ["Allocation", "allocate_bits", "budget_from_avg_bits", "layer_costs", "quantize_mixed",
           "packed_layer_costs", "quantize_mixed_packed", "PACKED_WIDTHS"]

PACKED_WIDTHS = (4, 8, 16)  # int4, int8 (pack-quantized) and dense (the source dtype; 16 stands for it)


@dataclass(frozen=True)
class Allocation:
    """The chosen width per unit, the bytes it costs and the budget it met."""

    bits: dict[str, int]
    cost_bytes: int
    budget_bytes: int
    objective: float

    def to_dict(self) -> dict:
        return {"bits": dict(self.bits), "cost_bytes": self.cost_bytes, "budget_bytes": self.budget_bytes,
                "objective": self.objective}


def budget_from_avg_bits(avg_bits: float, *, numel: int) -> int:
    """Bytes allowed for `numel` weights at `avg_bits` bits per weight (scales included), rounded down."""
    return int(math.floor(avg_bits * numel / 8))


def _check_inputs(costs: dict[str, dict[int, int]], importance: dict[str, float], budget_bytes: int) -> None:
    if set(costs) != set(importance):
        raise MoePruneError("importance and costs must name the same units")
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(max(c.values()) for c in costs.values())
    if budget_bytes < lo:
        raise MoePruneError(f"budget of {budget_bytes} bytes is below the smallest achievable size ({lo} bytes, "
                            "every unit at its lowest width); raise the budget")
    if budget_bytes > hi:
        raise MoePruneError(f"budget of {budget_bytes} bytes is above the largest possible size ({hi} bytes, "
                            "every unit at its highest width); lower the budget or quantize uniformly")
    for name, w in importance.items():
        if not math.isfinite(w) or w < 0:
            raise MoePruneError(f"importance of {name} is {w}; importance must be finite and >= 0")


def _greedy(costs, importance, budget_bytes) -> dict[str, int]:
    """Start everything at its cheapest width; upgrade by best importance gained per extra byte."""
    choice = {u: min(c, key=c.get) for u, c in costs.items()}
    spent = sum(costs[u][b] for u, b in choice.items())
    while True:
        best, best_ratio = None, -1.0
        for u, c in costs.items():
            for b, cost in c.items():
                extra = cost - c[choice[u]]
                if b <= choice[u] or spent + extra > budget_bytes:
                    continue
                ratio = importance[u] * (b - choice[u]) / max(extra, 1)
                if ratio > best_ratio:
                    best, best_ratio = (u, b, extra), ratio
        if best is None:
            return choice
        u, b, extra = best
        choice[u], spent = b, spent + extra


def _dp(costs, importance, budget_bytes, resolution: int) -> dict[str, int] | None:
    """Multiple-choice knapsack over bucketed (rounded-up) costs; None if it found nothing feasible."""
    units = sorted(costs)
    step = max(1, math.ceil(budget_bytes / resolution))
    cap = budget_bytes // step
    NEG = float("-inf")
    best = [NEG] * (cap + 1)
    best[0] = 0.0
    back: list[list[tuple[int, int] | None]] = []
    for u in units:
        nxt = [NEG] * (cap + 1)
        arg: list[tuple[int, int] | None] = [None] * (cap + 1)
        for used, value in enumerate(best):
            if value == NEG:
                continue
            for b, cost in costs[u].items():
                j = used + math.ceil(cost / step)
                if j <= cap and value + importance[u] * b > nxt[j]:
                    nxt[j], arg[j] = value + importance[u] * b, (used, b)
        best = nxt
        back.append(arg)
    end = max(range(cap + 1), key=lambda j: best[j])
    if best[end] == NEG:
        return None
    choice = {}
    for u, arg in zip(reversed(units), reversed(back)):
        used, b = arg[end]
        choice[u], end = b, used
    return choice


def allocate_bits(*, costs: dict[str, dict[int, int]], importance: dict[str, float], budget_bytes: int,
                  resolution: int = 4096) -> Allocation:
    """Pick a width per unit maximising sum(importance * bits) with total cost <= `budget_bytes`.

    Args:
        costs: {unit: {bits: bytes}} — what each candidate width of each unit costs on disk.
        importance: {unit: weight >= 0} (e.g. a layer's summed REAP score, or one expert's).
        budget_bytes: hard upper bound on the summed cost; below the minimum or above the maximum
            achievable cost is a `MoePruneError`.
        resolution: number of cost buckets of the DP (more = closer to the exact optimum).
    """
    _check_inputs(costs, importance, budget_bytes)

    def total(choice):
        return sum(costs[u][b] for u, b in choice.items())

    def value(choice):
        return sum(importance[u] * b for u, b in choice.items())

    candidates = [_greedy(costs, importance, budget_bytes)]
    dp = _dp(costs, importance, budget_bytes, resolution)
    if dp is not None:
        candidates.append(dp)
    feasible = [c for c in candidates if total(c) <= budget_bytes]
    choice = max(feasible, key=lambda c: (value(c), -total(c)))
    return Allocation(bits=choice, cost_bytes=total(choice), budget_bytes=budget_bytes, objective=value(choice))


def _fused(adapter, layer):
    layout = adapter.spec.layout
    return [(name, getattr(layer.experts, name)) for name in (layout.gate_up, layout.down)]


def layer_costs(adapter) -> tuple[dict[str, dict[int, int]], int]:
    """({"layer.<i>": {8: float8 bytes, dense bits: dense bytes}}, routed-expert weight count)."""
    costs, numel = {}, 0
    for layer in adapter.layers:
        dense_bits, f8, dense = 0, 0, 0
        for _, t in _fused(adapter, layer):
            rows = t.numel() // t.shape[-1]
            f8 += t.numel() + 4 * rows  # float8 payload + float32 per-row scale
            dense += t.numel() * t.element_size()
            dense_bits = 8 * t.element_size()
            numel += t.numel()
        costs[f"layer.{layer.index}"] = {8: f8, dense_bits: dense}
    return costs, numel


def _budget_bytes(model, adapter, budget, numel: int) -> int:
    """Bytes available to the routed-expert tensors under the user's budget."""
    if budget.avg_bits is not None:
        if not math.isfinite(budget.avg_bits) or budget.avg_bits <= 0:
            raise MoePruneError(f"--mixed-budget must be a positive number of bits, got {budget.avg_bits}")
        return budget_from_avg_bits(budget.avg_bits, numel=numel)
    experts = [t for layer in adapter.layers for _, t in _fused(adapter, layer)]
    other = _unique_bytes(model.state_dict().values(), skip=experts)
    expert_bytes = _unique_bytes(experts)
    if budget.max_bytes is None or budget.max_bytes <= other:
        raise MoePruneError(f"--max-bytes {budget.max_bytes} leaves nothing for the experts: the other weights "
                            f"alone take {other} bytes")
    if budget.max_bytes >= other + expert_bytes:
        raise MoePruneError(f"--max-bytes {budget.max_bytes} is at least the unquantized size of the weights "
                            f"({other + expert_bytes} bytes): nothing needs quantizing; lower it")
    return budget.max_bytes - other


def _storage_key(t) -> tuple:
    """Identifies the memory a tensor uses; ``state_dict()`` returns fresh tensor objects, so ``id()``
    would not match, and tied weights (embedding = lm_head) share one storage."""
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)


def _unique_bytes(tensors, *, skip=()) -> int:
    """Bytes of ``tensors``, each storage counted once, leaving out those that are ``skip``."""
    seen = {_storage_key(t) for t in skip}
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _allocate_layers(model, adapter, costs: dict, numel: int, *, budget, importance) -> Allocation:
    """One width per MoE layer from `costs` ({"layer.<i>": {bits: bytes}}) under the user's budget, maximising the
    importance-weighted bits; one-line errors for missing importance and a budget out of reach."""
    if importance is None:
        raise MoePruneError("mixed precision needs expert importance: pass --observations DIR")
    missing = [layer.index for layer in adapter.layers if layer.index not in importance]
    if missing:
        raise MoePruneError(f"no importance for MoE layers {missing}; the observations do not match this model")
    budget_bytes = _budget_bytes(model, adapter, budget, numel)
    lo, hi = (sum(pick(c.values()) for c in costs.values()) for pick in (min, max))
    if budget.avg_bits is not None and not lo <= budget_bytes <= hi:
        raise MoePruneError(f"--mixed-budget {budget.avg_bits:g} is outside the achievable range "
                            f"{8 * lo / numel:.2f}..{8 * hi / numel:.2f} bits per routed-expert weight")
    return allocate_bits(costs=costs, importance={f"layer.{i}": float(importance[i]) for i in adapter.layer_indices},
                         budget_bytes=budget_bytes)


def quantize_mixed(model, adapter, *, bits: int, budget, importance: dict[int, float] | None):
    """Allocate float8 / dense per MoE layer under `budget`, quantize with torchao, attach the HF quantizer."""
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    from moeprune.compress.quant_format import FORMAT_MIXED, QuantResult

    if bits != 8:
        raise MoePruneError("mixed precision stores fused experts as float8 or dense: use --bits 8 (4-bit experts "
                            "can only be saved uniformly; see docs/quantization.md)")
    before = _unique_bytes(model.state_dict().values())
    costs, numel = layer_costs(adapter)
    alloc = _allocate_layers(model, adapter, costs, numel, budget=budget, importance=importance)
    spec = adapter.spec
    fqn = {}
    for layer in adapter.layers:
        if alloc.bits[f"layer.{layer.index}"] == 8:
            for name, _ in _fused(adapter, layer):
                fqn[f"{spec.layers}.{layer.index}.{spec.block}.{spec.experts}.{name}"] = Float8WeightOnlyConfig()
    if fqn:
        config = FqnToConfig(fqn)
        quantize_(model, config, filter_fn=None)
        qc = TorchAoConfig(quant_type=config)
        model.hf_quantizer = TorchAoHfQuantizer(qc, pre_quantized=False)
        model.config.quantization_config = qc
    expert_before = sum(max(c.values()) for c in costs.values())
    return QuantResult(format=FORMAT_MIXED, bits=bits, group_size=None, strategy="layer",
                       layer_bits={k.split(".", 1)[1]: b for k, b in alloc.bits.items()},
                       allocation={**alloc.to_dict(), "avg_bits": 8 * alloc.cost_bytes / numel},
                       bytes_before=before, bytes_after=before - expert_before + alloc.cost_bytes)


def packed_layer_costs(adapter, *, widths, group_size: int) -> tuple[dict[str, dict[int, int]], int]:
    """({"layer.<i>": {bits: bytes}}, routed-expert weight count) for pack-quantized int widths (payload bits/8 per
    weight plus one scale in the weight dtype per group; CHANNEL: per row) and dense (16: the dtype's bytes)."""
    from moeprune.compress.quantize_plan import CHANNEL

    costs, numel = {}, 0
    layout = adapter.spec.layout
    for layer in adapter.layers:
        row = {}
        for _, t in _fused(adapter, layer):
            width = t.shape[-2] if layout.transposed else t.shape[-1]
            groups = t.numel() // (width if group_size == CHANNEL else group_size)
            for b in widths:
                cost = t.numel() * t.element_size() if b == 16 else t.numel() * b // 8 + groups * t.element_size()
                row[b] = row.get(b, 0) + cost
            numel += t.numel()
        costs[f"layer.{layer.index}"] = row
    return costs, numel


def quantize_mixed_packed(model, adapter, *, budget, importance: dict[int, float] | None, widths=PACKED_WIDTHS,
                          group_size=None):
    """Allocate an int width (4 / 8) or dense per MoE layer under `budget` from the layer importance and round
    each quantized layer's routed experts to nearest in place (the checkpoint writer packs them per layer);
    attention, shared experts and every other weight stay dense."""
    from moeprune.compress.quant_format import FORMAT_MIXED_PACKED, QuantResult
    from moeprune.compress.quantize_plan import CHANNEL, checkpoint_patterns, quant_targets, resolve_group_size
    from moeprune.compress.rtn import expert_views, fake_quantize

    widths = tuple(sorted(set(int(b) for b in widths)))
    if not set(widths) <= set(PACKED_WIDTHS) or len(widths) < 2:
        raise MoePruneError(f"--mixed-widths {','.join(map(str, widths))}: choose two or more of 4, 8 and 16 (dense)")
    targets = quant_targets(model, adapter)
    group = resolve_group_size(dict((w, n) for n, w in targets.experts), group_size)
    before = _unique_bytes(model.state_dict().values())
    costs, numel = packed_layer_costs(adapter, widths=widths, group_size=group)
    alloc = _allocate_layers(model, adapter, costs, numel, budget=budget, importance=importance)
    import torch

    with torch.no_grad():
        for layer in adapter.layers:
            b = alloc.bits[f"layer.{layer.index}"]
            if b < 16:
                for view in expert_views(adapter, layer):
                    view.copy_(fake_quantize(view, bits=b, group_size=group))
    expert_pattern, kept_pattern = checkpoint_patterns(adapter)
    expert_before = sum(max(c.values()) for c in costs.values())
    channel = group == CHANNEL
    return QuantResult(format=FORMAT_MIXED_PACKED, bits=widths[0], group_size=None if channel else group,
                       strategy="layer", expert_pattern=expert_pattern, kept_pattern=kept_pattern,
                       dense_targets=[], ignore=targets.ignore,
                       layer_bits={k.split(".", 1)[1]: b for k, b in alloc.bits.items()},
                       allocation={**alloc.to_dict(), "avg_bits": 8 * alloc.cost_bytes / numel,
                                   "widths": list(widths)},
                       bytes_before=before, bytes_after=before - expert_before + alloc.cost_bytes)
