"""GPTQ (Frantar et al., 2022): weight-only int4/int8 that uses calibration inputs to choose the rounding.

For a linear y = W x and calibration inputs X (rows x), GPTQ minimises ||W X^T - Q X^T||^2 column by column:
each input column's rounding error is spread over the columns not yet quantized through H^-1, H = 2 X^T X.
This module holds

* `gptq_solve(weight, hessian, ...)`: the solver for one weight (out, in) or a stack (..., out, in) with one
  Hessian each (the routed experts of a layer are solved together). Dampening lambda * mean(diag H) (default
  1%), optional act-order (columns by descending diag H), columns processed in blocks whose errors reach
  the later columns through the upper Cholesky factor of H^-1 (the paper's formulation).
* `HessianSet` / `gptq_quantize_layers`: Hessians accumulated (float32) as calibration batches pass, one
  decoder layer at a time: attention / dense-MLP / shared-expert linears from their inputs, each routed
  expert from the tokens routed to it (gate_up: those rows of the hidden states; down: their intermediate
  activations). Each decoder layer sees the outputs of the already quantized earlier layers.

Storage: the result is exactly what the pack-quantized writer stores. Scales are symmetric, group amax /
qmax (qmax = 2^(b-1) - 1), rounded to the weight dtype; codes are clamped to [-qmax, qmax], and in every
group the element that set the scale is given the code +-qmax. The writer recomputes each scale as the
amax of the saved weights / qmax, which is then the solver's scale, so the saved checkpoint dequantizes to
the weights in memory (tested through a stock transformers reload).

Fallback to round-to-nearest (RTN): routed experts with fewer than `min_tokens` calibration rows (unreached
experts have none), any weight whose Hessian stays singular after 5 dampening increases, and linears outside
the decoder layers. With H = I GPTQ is RTN exactly (no error to propagate), which the tests use.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.compress.quantize_plan import CHANNEL
from moeprune.compress.rtn import expert_views, fake_quantize, scale_floor
from moeprune.errors import MoePruneError

__all__ = ["GPTQOptions", "GPTQWeight", "gptq_solve", "gptq_quantize_layers", "HessianSet", "ResidentLayers"]


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings: dampening (fraction of mean(diag H)), act-order, column block size, and the fewest
    calibration rows a routed expert needs for GPTQ (fewer: RTN)."""

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    min_tokens: int = 32
    sequential: bool = True  # False: every layer calibrates on the unquantized model's inputs (for comparison)

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 1):
            raise MoePruneError(f"GPTQ dampening must be in (0, 1], got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise MoePruneError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise MoePruneError(f"GPTQ min_tokens must be an integer >= 0, got {self.min_tokens!r}")

    def to_dict(self) -> dict:
        return {"damp": self.damp, "act_order": self.act_order, "block_size": self.block_size,
                "min_tokens": self.min_tokens, "sequential": self.sequential}


@dataclass
class GPTQWeight:
    """A solved weight: `weight` the dequantized values (weight dtype), `codes` the integers (int8, same shape),
    `scales` (..., out, in / group) in the weight dtype, and which stacked entries fell back to RTN."""

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    fallback: list[int] = field(default_factory=list)


def _group_scales(w: torch.Tensor, qmax: int, dtype: torch.dtype):
    """For groups w (..., out, g): scale (..., out) rounded to `dtype`, the index of the element that sets it,
    and that element's sign (0 for an all-zero group)."""
    amax, idx = w.abs().max(dim=-1)
    scale = (amax / qmax).clamp(min=scale_floor(dtype)).to(dtype).to(w.dtype)
    sign = torch.sign(w.gather(-1, idx.unsqueeze(-1)).squeeze(-1))
    return scale, idx, sign


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, list[int]]:
    """Upper Cholesky factor of (H + lambda I)^-1 per stacked entry (float64); entries still singular after
    5 tenfold dampening increases get the identity (=> RTN) and are returned in the list."""
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)  # (B,)
    factor = torch.empty_like(h)
    todo = torch.arange(h.shape[0], device=h.device)
    frac = damp
    for _ in range(6):
        hd = h[todo] + (frac * mean_diag[todo])[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        ok = info == 0
        if ok.any():
            inv = torch.cholesky_inverse(chol[ok])
            up, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            good = info2 == 0
            idx = todo[ok][good]
            factor[idx] = up[good]
            ok_idx = set(idx.tolist())
        else:
            ok_idx = set()
        todo = torch.tensor([int(t) for t in todo.tolist() if int(t) not in ok_idx], dtype=torch.long,
                            device=h.device)
        if todo.numel() == 0:
            return factor, []
        frac *= 10
    factor[todo] = eye
    return factor, todo.tolist()


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, damp: float = 0.01,
               act_order: bool = False, block_size: int = 128) -> GPTQWeight:
    """Quantize `weight` (out, in) or (..., out, in) given its Hessian(s) (in, in) or (..., in, in).

    `group_size` is weights per scale along the input dim, or CHANNEL (one scale per row). Without act-order a
    group's scale is taken from the group's weights as they are when its first column comes up (errors of the
    earlier columns included; blocks are a multiple of the group, so the group is up to date); with act-order,
    and per row (channel), scales come from the original weights (columns of a group are no longer adjacent).
    Computes in float32 (float64 for a float64 weight); the Cholesky factor in float64.
    """
    if bits < 2 or bits > 8:
        raise MoePruneError(f"GPTQ bits must be between 2 and 8, got {bits}")
    dtype = weight.dtype
    *lead, out, n = weight.shape
    if tuple(hessian.shape) != (*lead, n, n):
        raise MoePruneError(f"Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    gs = n if group_size == CHANNEL else int(group_size)
    if gs <= 0 or n % gs:
        raise MoePruneError(f"group size {group_size} does not divide the input width {n}")
    ng, qmax = n // gs, 2 ** (bits - 1) - 1
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.detach().reshape(-1, out, n).to(cdt).clone()
    h = hessian.detach().reshape(-1, n, n).to(torch.float64).clone()
    nb = w.shape[0]
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0  # inputs never seen: no information, the column is rounded on its own
    static = act_order or group_size == CHANNEL
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # (B, n)
    else:
        perm = torch.arange(n, device=w.device).expand(nb, n)
    if act_order:
        w = w.gather(-1, perm[:, None, :].expand(nb, out, n))
        h = h.gather(-1, perm[:, None, :].expand(nb, n, n)).gather(-2, perm[:, :, None].expand(nb, n, n))
    u64, fallback = _inverse_factor(h, damp)
    u = u64.to(cdt)

    scales = torch.empty(nb, out, ng, dtype=cdt, device=w.device)
    forced_col = torch.empty(nb, out, ng, dtype=torch.long, device=w.device)  # original column index
    forced_sign = torch.empty(nb, out, ng, dtype=cdt, device=w.device)
    if static:  # from the original weights, in original column order
        orig = weight.detach().reshape(-1, out, ng, gs).to(cdt)
        s, idx, sign = _group_scales(orig, qmax, dtype)
        scales[:], forced_sign[:] = s, sign
        forced_col[:] = idx + torch.arange(ng, device=w.device) * gs
    block = block_size if static else max(1, -(-block_size // gs)) * gs
    q_all = torch.empty_like(w)
    rows = torch.arange(nb, device=w.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[..., i1:i2].clone()
        err = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static:
                g = perm[:, c] // gs  # (B,)
                s = scales[rows, :, g]  # (B, out)
                force = forced_col[rows, :, g] == perm[:, c][:, None]
                sign = forced_sign[rows, :, g]
            else:
                g = c // gs
                if c % gs == 0:
                    s_g, idx, sign_g = _group_scales(w1[..., i:i + gs], qmax, dtype)
                    scales[..., g], forced_col[..., g], forced_sign[..., g] = s_g, idx + c, sign_g
                s, sign = scales[..., g], forced_sign[..., g]
                force = forced_col[..., g] == c
            col = w1[..., i]
            q = torch.clamp(torch.round(col / s), -qmax, qmax)
            q = torch.where(force, sign * qmax, q)
            q_all[..., c] = q
            e = (col - q * s) / u1[:, i, i][:, None]
            w1[..., i:] -= e.unsqueeze(-1) * u1[:, i, i:].unsqueeze(1)
            err[..., i] = e
        if i2 < n:
            w[..., i2:] -= err @ u[:, i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm, dim=-1)
        q_all = q_all.gather(-1, inv[:, None, :].expand(nb, out, n))
    deq = (q_all.reshape(nb, out, ng, gs) * scales.unsqueeze(-1)).reshape(nb, out, n)
    return GPTQWeight(weight=deq.to(dtype).reshape(weight.shape), codes=q_all.to(torch.int8).reshape(weight.shape),
                      scales=scales.to(dtype).reshape(*lead, out, ng), fallback=fallback)


# ---------------------------------------------------------------------------------------------- Hessians
class _Accumulator:
    """Sum of x^T x (float32) over rows of one input width, optionally per expert."""

    def __init__(self, width: int, experts: int | None, device):
        shape = (width, width) if experts is None else (experts, width, width)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.rows = torch.zeros(() if experts is None else (experts,), dtype=torch.long, device=device)

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        if expert is None:
            self.sum.addmm_(x.T, x)
            self.rows += x.shape[0]
        else:
            self.sum[expert].addmm_(x.T, x)
            self.rows[expert] += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / rows (rows 0: zeros)."""
        rows = self.rows.clamp(min=1).to(torch.float32)
        return 2 * self.sum / (rows if rows.dim() == 0 else rows[:, None, None])


class HessianSet:
    """Hessians of one decoder layer's quantized linears and routed experts, filled by hooks during forwards."""

    def __init__(self, adapter, layer_prefix: str, linears: dict[str, nn.Linear], moe_layer):
        self.adapter, self.moe = adapter, moe_layer
        self.mask: torch.Tensor | None = None  # (rows,) bool: non-padding tokens of the current batch
        self.linears = linears
        self.acc = {name: _Accumulator(m.in_features, None, m.weight.device) for name, m in linears.items()}
        self._handles: list = []
        self.expert_acc: dict[str, _Accumulator] = {}
        if moe_layer is not None:
            gu, dn = expert_views(adapter, moe_layer)
            device = gu.device
            self.expert_acc = {"gate_up": _Accumulator(gu.shape[-1], gu.shape[0], device),
                               "down": _Accumulator(dn.shape[-1], dn.shape[0], device)}

    def _valid(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        if self.mask is not None and self.mask.shape[0] == x.shape[0]:
            x = x[self.mask]
        return x

    def attach(self) -> "HessianSet":
        for name, module in self.linears.items():
            acc = self.acc[name]

            def hook(_m, args, kwargs, acc=acc):
                x = args[0] if args else kwargs.get("input")
                acc.add(self._valid(x.detach()))

            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.moe is not None:
            experts = self.moe.experts
            experts.forward = types.MethodType(_observed_experts(self), experts)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.moe is not None and "forward" in vars(self.moe.experts):
            del self.moe.experts.forward

    def accumulate(self, layer: nn.Module, index: int, inputs: list[dict]) -> "HessianSet":
        """Run decoder layer `index` over its captured `inputs` with the hooks attached (padding masked out);
        the hooks are gone when this returns, whatever happens."""
        self.attach()
        try:
            for batch in inputs:
                self.mask = batch["mask"]
                _run_layer(layer, index, batch)
        finally:
            self.detach()
        return self


def _expert_hidden(adapter, layer, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert j's intermediate activations (T, I) for inputs x (T, H), the input of its down projection: the
    first half of `MoEAdapter.expert_forward`."""
    experts, lay = layer.experts, adapter.spec.layout
    w1 = getattr(experts, lay.gate_up)[j]
    h = x @ w1 if lay.transposed else x @ w1.transpose(0, 1)
    if lay.biases:
        h = h + getattr(experts, lay.biases[0])[j]
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(h)
    g, u = h.chunk(2, dim=-1)
    return experts.act_fn(g) * u


def _observed_experts(hs: HessianSet):
    """An experts forward for the Hessian pass: each expert's routed rows feed its two Hessians. It returns
    zeros: within a decoder layer nothing quantized reads the routed experts' output, and the layer's output
    is recomputed with the real forward once the layer is quantized."""
    adapter, layer = hs.adapter, hs.moe

    def forward(self, hidden_states, top_k_index, top_k_weights):
        t, k = top_k_index.shape
        flat_e = top_k_index.reshape(-1)
        token = torch.arange(t * k, device=hidden_states.device) // k
        keep = (flat_e >= 0) & (flat_e < layer.num_experts)  # some kernels mark dropped slots out of range
        if hs.mask is not None and hs.mask.shape[0] == t:
            keep &= hs.mask[token]
        flat_e, token = flat_e[keep], token[keep]
        order = torch.argsort(flat_e, stable=True)
        flat_e, token = flat_e[order], token[order]
        counts = torch.bincount(flat_e, minlength=layer.num_experts).tolist()
        start = 0
        for j, c in enumerate(counts):
            if c:
                x = hidden_states[token[start:start + c]]
                hs.expert_acc["gate_up"].add(x, j)
                hs.expert_acc["down"].add(_expert_hidden(adapter, layer, j, x), j)
                start += c
        return torch.zeros_like(hidden_states)

    return forward


# ---------------------------------------------------------------------------------------------- the pass
class _Stop(Exception):
    pass


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_inputs(model, layers: nn.ModuleList, batches: list[dict], device=None):
    """One forward per batch with every decoder layer replaced by a recorder: layer 0's positional inputs and
    every layer's keyword inputs (masks, positions). No decoder layer's weights are read (a weightless model
    whose embedding is loaded will do); the hidden states are computed layer by layer afterwards."""
    per_batch = []
    state: dict = {}

    def recorder(index):
        def forward(_self, *args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                state["hidden"], state["rest"] = hidden, args[1:]
            state["kwargs"][index] = kwargs
            if index == len(layers) - 1:
                raise _Stop
            return hidden
        return forward

    for index, layer in enumerate(layers):
        layer.forward = types.MethodType(recorder(index), layer)
    if device is None:
        device = model.get_input_embeddings().weight.device
    try:
        for batch in batches:
            state.clear()
            state["kwargs"] = {}
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            try:
                model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), use_cache=False)
            except _Stop:
                pass
            if len(state["kwargs"]) != len(layers):
                raise MoePruneError(f"the model called {len(state['kwargs'])} of its {len(layers)} decoder layers")
            flat = None if mask is None else mask.reshape(-1).bool().to(device)
            per_batch.append({"hidden": state["hidden"].detach(), "rest": state["rest"], "kwargs": state["kwargs"],
                              "mask": None if flat is None or bool(flat.all()) else flat})
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
    return per_batch


def _run_layer(layer: nn.Module, index: int, batch: dict) -> torch.Tensor:
    return _layer_output(layer(batch["hidden"], *batch["rest"], **batch["kwargs"][index]))


class ResidentLayers:
    """Where the layer pass finds its weights: here, a model already in memory (nothing to load or free). The
    layer-wise executor passes an object with the same methods that reads each decoder layer from the
    safetensors files before it is quantized and frees it after (moeprune/execution/quantize_pass.py)."""

    def load_outer(self) -> None:  # what the forward reads before the decoder layers (embedding, rotary tables)
        pass

    def release_outer(self) -> None:
        pass

    def load_modules(self, names: list[str]) -> None:  # linears outside the decoder layers
        pass

    def release_modules(self, names: list[str]) -> None:
        pass

    def load(self, index: int) -> None:  # decoder layer `index`
        pass

    def release(self, index: int) -> None:
        pass


def _split_targets(model, spec, targets: list[str], n_layers: int):
    """Quantized linear names -> ({decoder layer index: [names]}, [names outside the decoder layers])."""
    prefix = f"{spec.layers}."
    by_layer: dict[int, list[str]] = {}
    outside = []
    for name in targets:
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        head = rest.split(".", 1)[0]
        if head.isdigit() and int(head) < n_layers:
            by_layer.setdefault(int(head), []).append(name)
        else:
            outside.append(name)
    return by_layer, outside


def _expert_tensors(adapter, moe) -> dict[str, torch.Tensor]:
    """In-memory name -> the layer's fused routed-expert weight tensors (what quantization changes)."""
    spec, lay = adapter.spec, adapter.spec.layout
    base = f"{spec.layers}.{moe.index}.{spec.block}.{spec.experts}."
    return {base + t: getattr(moe.experts, t).detach() for t in (lay.gate_up, lay.down)}


def gptq_quantize_layers(model, adapter, batches: list[dict] | None, *, bits: int, group_size: int,
                         targets: list[str], options: GPTQOptions | None = None, method: str = "gptq",
                         access=None, on_quantized=None, log=None) -> dict | None:
    """Quantize `model` in place, decoder layer by decoder layer (see the module docstring): GPTQ from the
    calibration `batches`, or round to nearest (`method="rtn"`, no batches needed).

    `targets` are the nn.Linear names to quantize (`quant_targets`); every routed expert tensor is quantized.
    `access` loads and frees the weights of a model that is not in memory (default `ResidentLayers`: it is);
    `on_quantized(layer index or None, {in-memory name: quantized tensor})` sees every quantized tensor while
    its layer is loaded. GPTQ returns what was done (per-layer counts of GPTQ / RTN experts, the fallbacks,
    seconds per layer); RTN returns None.
    """
    from moeprune.models.adapter import _get_path

    spec = adapter.spec
    gptq = method == "gptq"
    options = options or GPTQOptions()
    if gptq and spec.experts_call != "indexed":
        raise MoePruneError(f"--method gptq does not support {spec.name}'s dense-prescaled experts yet; "
                            "use --method rtn")
    if gptq and not batches:
        raise MoePruneError("GPTQ needs calibration data; the calibration set is empty")
    access = access or ResidentLayers()
    report = on_quantized or (lambda _index, _tensors: None)
    layers = _get_path(model, spec.layers)
    modules = dict(model.named_modules())
    moe_by_index = {layer.index: layer for layer in adapter.layers}
    prefix = f"{spec.layers}."
    by_layer, outside = _split_targets(model, spec, targets, len(layers))
    summary = {"layers": {}, "rtn_linears": list(outside), "options": options.to_dict()}
    solve = dict(bits=bits, group_size=group_size, damp=options.damp, act_order=options.act_order,
                 block_size=options.block_size)
    with torch.no_grad():
        if outside:
            access.load_modules(outside)
            for name in outside:
                w = modules[name].weight
                w.copy_(fake_quantize(w, bits=bits, group_size=group_size))
            report(None, {f"{name}.weight": modules[name].weight.detach() for name in outside})
            access.release_modules(outside)
        inputs = None
        if gptq:
            access.load_outer()
            try:
                inputs = _capture_inputs(model, layers, batches)
            finally:
                access.release_outer()
        for index, layer in enumerate(layers):
            start = time.perf_counter()
            access.load(index)
            linears = {name: modules[name] for name in by_layer.get(index, [])}
            moe = moe_by_index.get(index)
            if not gptq:
                for module in linears.values():
                    module.weight.copy_(fake_quantize(module.weight, bits=bits, group_size=group_size))
                if moe is not None:
                    for view in expert_views(adapter, moe):
                        view.copy_(fake_quantize(view, bits=bits, group_size=group_size))
            else:
                record = _gptq_layer(adapter, layer, index, linears, moe, inputs, solve, options, bits, group_size,
                                     prefix)
            quantized = {f"{name}.weight": m.weight.detach() for name, m in linears.items()}
            if moe is not None:
                quantized.update(_expert_tensors(adapter, moe))
            report(index, quantized)
            if gptq:
                record["seconds"] = round(time.perf_counter() - start, 3)
                summary["layers"][str(index)] = record
                if log:
                    log(f"gptq layer {index}: {record['linears']} linears, "
                        f"{record.get('gptq_experts', 0)} experts GPTQ, {len(record.get('rtn_experts', []))} RTN "
                        f"({record['seconds']:.1f}s)")
            access.release(index)
    return summary if gptq else None


def _gptq_layer(adapter, layer, index, linears, moe, inputs, solve, options, bits, group_size, prefix) -> dict:
    """GPTQ for one loaded decoder layer, then its outputs (quantized, or not with `sequential=False`) become
    the next layer's inputs."""
    hs = HessianSet(adapter, f"{prefix}{index}.", linears, moe)
    hs.accumulate(layer, index, inputs)
    if not options.sequential:  # the next layer's inputs from this layer unquantized
        outputs = [_run_layer(layer, index, batch).detach() for batch in inputs]
    record = {"linears": len(hs.linears), "rtn_linears": []}
    for name, module in hs.linears.items():
        acc = hs.acc[name]
        if int(acc.rows) == 0:
            module.weight.copy_(fake_quantize(module.weight, bits=bits, group_size=group_size))
            record["rtn_linears"].append(name)
            continue
        res = gptq_solve(module.weight, acc.hessian(), **solve)
        module.weight.copy_(res.weight)
        if res.fallback:
            record["rtn_linears"].append(name)
    if moe is not None:
        record.update(_solve_experts(adapter, moe, hs, solve, options, bits, group_size))
    del hs
    for i, batch in enumerate(inputs):  # the next layer's inputs: this layer's outputs, quantized
        batch["hidden"] = _run_layer(layer, index, batch).detach() if options.sequential else outputs[i]
    return record


def _solve_experts(adapter, moe, hs: HessianSet, solve: dict, options: GPTQOptions, bits: int, group_size: int):
    views = dict(zip(("gate_up", "down"), expert_views(adapter, moe)))
    rows = hs.expert_acc["gate_up"].rows
    enough = (rows >= max(1, options.min_tokens)).nonzero().flatten().tolist()
    thin = [j for j in range(rows.shape[0]) if j not in set(enough)]
    fallback: set[int] = set(thin)
    for key, view in views.items():
        acc = hs.expert_acc[key]
        if enough:
            idx = torch.tensor(enough, device=view.device)
            res = gptq_solve(view[idx], acc.hessian()[idx], **solve)
            view[idx] = res.weight
            fallback |= {enough[i] for i in res.fallback}
        for j in thin:
            view[j] = fake_quantize(view[j], bits=bits, group_size=group_size)
    return {"gptq_experts": len(enough), "rtn_experts": sorted(fallback),
            "expert_rows_min": int(rows.min()), "expert_rows_max": int(rows.max()), "expert_rows": int(rows.sum())}
