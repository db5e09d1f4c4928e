"""What uniform quantization touches and at which group size, decided from shapes alone (no weight is read).

The field's convention (llm-compressor's MoE recipes, vLLM's kernels): every routed expert and every
other `nn.Linear` is quantized, except the routers, the shared-expert gates and `lm_head`, which stay in
the source dtype (a router has as many outputs as experts, e.g. 16, which int4 kernels refuse; they are
also the most precision-sensitive weights and a negligible share of the bytes).

Group size (weights per scale along the input dim):
* `None` / "auto": the largest of 128, 64, 32 that divides every quantized input width (vLLM's GPU MoE
  kernel, Marlin, takes 32/64/128); when none does, one scale per output row ("channel", which every
  kernel takes), so default options always give a checkpoint that serves.
* an integer: used as given; a width it does not divide is a one-line error naming the tensor.
* "channel" (or -1): one scale per output row.

`check_quantize(model, bits, group_size)` runs on a weightless (meta-device) model, so a plan can reject
a recipe before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moeprune.errors import MoePruneError

__all__ = ["AUTO_GROUP_SIZES", "CHANNEL", "SUPPORTED_BITS", "QuantTargets", "check_quantize", "quant_targets",
           "resolve_group_size", "parse_group_size", "gptq_layer_memory", "checkpoint_patterns"]

SUPPORTED_BITS = (4, 8)
AUTO_GROUP_SIZES = (128, 64, 32)
CHANNEL = -1  # one scale per output row (group size = the input width), as GPTQ/vLLM write it


@dataclass
class QuantTargets:
    """The tensors uniform quantization touches, and their input widths (the dim groups run along)."""

    experts: list[tuple[str, int]] = field(default_factory=list)  # (fused expert tensor, input width)
    linears: list[tuple[str, int]] = field(default_factory=list)  # (nn.Linear name, in_features)
    ignore: list[str] = field(default_factory=list)  # nn.Linear kept in the source dtype

    def widths(self) -> dict[int, str]:
        """{input width: the first tensor that has it}."""
        out: dict[int, str] = {}
        for name, width in self.experts + self.linears:
            out.setdefault(width, name)
        return out


def _kept_dense(model: nn.Module, adapter) -> set[str]:
    """Module names that stay in the source dtype: routers, shared-expert gates (per MoE layer)."""
    spec = adapter.spec
    names = set()
    for layer in adapter.layers:
        block = f"{spec.layers}.{layer.index}.{spec.block}"
        names.add(f"{block}.{spec.router}")
        if spec.shared_gate:
            names.add(f"{block}.{spec.shared_gate}")
    return names


def quant_targets(model: nn.Module, adapter=None) -> QuantTargets:
    """Which expert tensors and linear layers are quantized, which linear layers are kept dense."""
    from moeprune.models import MoEAdapter

    adapter = adapter or MoEAdapter(model)
    spec, layout = adapter.spec, adapter.spec.layout
    targets = QuantTargets()
    for layer in adapter.layers:
        for name in (layout.gate_up, layout.down):
            t = getattr(layer.experts, name)  # (E, out, in), or (E, in, out) when transposed
            width = t.shape[-2] if layout.transposed else t.shape[-1]
            targets.experts.append((f"{spec.layers}.{layer.index}.{spec.block}.{spec.experts}.{name}", int(width)))
    dense = _kept_dense(model, adapter)
    out_emb = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is out_emb or any(name == d or name.startswith(d + ".") for d in dense):
            targets.ignore.append(name)
        else:
            targets.linears.append((name, module.in_features))
    modules = dict(model.named_modules())  # routers that are not nn.Linear (e.g. a top-k router module)
    targets.ignore += sorted(d for d in dense if d in modules and d not in targets.ignore)
    return targets


def checkpoint_patterns(adapter) -> tuple[str, str]:
    """Regexes of the checkpoint keys of the routed experts (group 1: the layer index; the block may be renamed
    on disk, e.g. mlp -> block_sparse_moe) and of the routers / shared-expert gates' weights."""
    import re

    spec = adapter.spec
    layer_alt = "|".join(str(layer.index) for layer in adapter.layers)
    experts = rf"^{re.escape(spec.layers)}\.({layer_alt})\.(.+\.)?{re.escape(spec.experts)}\."
    kept = "|".join(re.escape(m) for m in (spec.router, spec.shared_gate) if m)
    return experts, rf"^{re.escape(spec.layers)}\.({layer_alt})\.(.+\.)?({kept})\.weight$"


def parse_group_size(value, option: str = "--group-size") -> int | None:
    """A user's group size: None/"auto" -> None, "channel"/-1 -> CHANNEL, else a positive integer."""
    if value is None or value == "auto":
        return None
    if value == "channel" or value == CHANNEL:
        return CHANNEL
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0 or str(number) != str(value).strip():
        raise MoePruneError(f"{option} must be a positive integer, 'auto' or 'channel', got {value!r}")
    return number


def resolve_group_size(widths: dict[int, str], group_size, option: str = "--group-size") -> int:
    """The group size to use for these input widths (see the module docstring); CHANNEL or a divisor."""
    group = parse_group_size(group_size, option)
    if group == CHANNEL:
        return CHANNEL
    if group is None:
        return next((g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths)), CHANNEL)
    for width, name in sorted(widths.items()):
        if width % group:
            raise MoePruneError(f"input width {width} of {name} is not a multiple of {option} {group}; "
                                f"choose a group size that divides every quantized width, or 'auto'")
    return group


def check_quantize(model: nn.Module, bits: int, group_size=None, *, option: str = "--group-size") -> int:
    """Check a uniform quantization of `model` (weights may be on the meta device); the group size to use.

    Raises MoePruneError for unsupported bits, a bad group size, or one that does not divide a width.
    """
    if bits not in SUPPORTED_BITS:
        raise MoePruneError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return resolve_group_size(quant_targets(model).widths(), group_size, option)


def gptq_layer_memory(model: nn.Module, *, n_keep: int | None, weight_bytes: int) -> dict[str, int]:
    """Bytes GPTQ needs for its largest decoder layer, from shapes alone (weights may be on the meta device),
    with `n_keep` routed experts per MoE layer (None: all): the layer's weights streamed in (3 x: the read,
    the conversion to the in-memory layout and the loaded copy, as the layer-wise loader counts them), its
    Hessians (float32, in^2 per quantized linear and per kept expert for gate_up and down) and the solver's
    float64 work on the largest stack (the Hessian copy, its Cholesky factor and inverse: 3 x in^2 x 8 per
    entry). The calibration hidden states come on top (tokens x hidden x dtype)."""
    from moeprune.models import MoEAdapter
    from moeprune.models.adapter import _get_path

    adapter = MoEAdapter(model)
    spec, layout = adapter.spec, adapter.spec.layout
    moe = {layer.index: layer for layer in adapter.layers}
    targets = quant_targets(model, adapter)
    best = {"weights": 0, "hessians": 0, "solver": 0, "total": 0}
    for index, layer in enumerate(_get_path(model, spec.layers)):
        prefix = f"{spec.layers}.{index}."
        frac = 1.0
        hessians, solver = 0, 0
        if index in moe:
            m = moe[index]
            keep = m.num_experts if n_keep is None else min(n_keep, m.num_experts)
            frac = keep / m.num_experts
            for name in (layout.gate_up, layout.down):
                t = getattr(m.experts, name)
                width = t.shape[-2] if layout.transposed else t.shape[-1]
                hessians += keep * width * width * 4
                solver = max(solver, keep * width * width * 8 * 3)
        expert_ids = {id(getattr(moe[index].experts, t)) for t in layout.tensors} if index in moe else set()
        numel = sum(p.numel() * (frac if id(p) in expert_ids else 1.0) for p in layer.parameters())
        for name, width in targets.linears:
            if name.startswith(prefix):
                hessians += width * width * 4
                solver = max(solver, width * width * 8 * 3)
        row = {"weights": int(numel * weight_bytes * 3), "hessians": hessians, "solver": solver}
        row["total"] = row["weights"] + row["hessians"] + row["solver"]
        if row["total"] > best["total"]:
            best = row
    return best
