"""Low-rank adapters (LoRA, arXiv 2106.09685) on the MoE blocks, for `moe_kd` with `recover.adapter: lora`.

Full `moe_kd` trains every MoE-block weight, (16 + d) bytes of training state per parameter (recover/memory.py):
hundreds of GB on the models users run. With adapters the MoE blocks keep their weights frozen and train

- the router tensors (and router biases that are parameters) fully: they are small;
- for every other matrix of the block whose low-rank factors are smaller than itself -- the fused routed
  experts (3-D, one matrix per expert: (E, m, n)) and the shared experts' linears (2-D (m, n)) -- two factors
  per matrix, B (m, R) and A (R, n), so that the matrix in use is

      W_eff = (W.float() + scale * (B @ A)).to(W.dtype),        scale = alpha / R

  B starts at zero, so training starts exactly at the pruned model; A starts uniform in +-1/sqrt(n) (seeded);
- everything else of the block (per-expert biases, a shared expert's one-output gate) fully.

The factorisation does not care which of the two dims of a stored matrix is "in" or "out", so transposed
layouts (GPT-OSS, Llama-4: (E, in, out)) need no flag: the ArchSpec only says which tensors are router
tensors (`router_tensors`) and which are per-expert (`layout.tensors`, used for the memory count).

Every module of the block that owns an adapted tensor is replaced, while adapters are attached, by a
`LoRAModule` that calls the original module's own forward through `torch.func.functional_call` with W_eff in
place of W, so any experts implementation (eager loop, grouped_mm, ...) works unchanged. Merging computes the
same W_eff with the same expression, so a merged checkpoint gives exactly the adapted model's logits
(tests/recover/test_adapters.py checks this through a stock transformers loader). The wrapper reads the frozen
base only through `LoRAModule.base_tensor(name)` (default: the resident parameter), so a streaming trainer can
supply frozen weights from disk instead.

While training, a wrapper's forward runs under activation checkpointing: autograd keeps its inputs, not
W_eff (otherwise every MoE layer would keep a second copy of its expert weights for the backward pass);
W_eff is recomputed once in the backward pass. Memory: recover/memory.py.

API:
    lora = attach_adapters(model, rank=16, alpha=32.0, seed=0)   # wrappers in place, base frozen
    lora.trainable_parameters()  # 'layer.path' -> (layer, path, parameter): factors and fully trained tensors
    lora.merged_tensors()        # layer -> {block path: W_eff} for every adapted tensor (through base_tensor)
    lora.merge()                 # W_eff written into the resident base tensors, wrappers removed: a stock model
    lora.detach()                # wrappers removed, adapters discarded
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter

__all__ = ["Target", "adapter_targets", "LoRAModule", "Adapters", "attach_adapters", "lowrank_numel",
           "DEFAULT_RANK", "fully_trained", "fully_trained_parameters", "adapted_modules"]

DEFAULT_RANK = 16


@dataclass(frozen=True)
class Target:
    """One parameter of an MoE block and how adapter training treats it."""

    path: str  # dotted path within the block
    shape: tuple[int, ...]
    lowrank: bool  # True: frozen, with low-rank factors; False: trained fully
    per_expert: bool  # dim 0 indexes the routed experts (pruning slices it)


def lowrank_numel(shape: tuple[int, ...], rank: int) -> int:
    """Elements of the factors B (..., m, R) and A (..., R, n) of a tensor of `shape` (..., m, n)."""
    lead = math.prod(shape[:-2])
    return lead * rank * (shape[-2] + shape[-1])


def adapter_targets(adapter: MoEAdapter, layer, rank: int) -> list[Target]:
    """Every parameter of the layer's MoE block, low-rank or trained fully (module docstring). Works on a model
    built on the meta device (shapes only)."""
    from moeprune.recover.block import layer_router_parameters

    spec = adapter.spec
    router_ids = {id(p) for p in layer_router_parameters(adapter, layer).values()}
    experts_ids = {id(getattr(layer.experts, t)) for t in spec.layout.tensors if hasattr(layer.experts, t)}
    out, seen = [], set()
    for path, p in layer.block.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(p.shape)
        router = id(p) in router_ids or path.startswith(spec.router + ".")
        small = p.dim() < 2 or lowrank_numel(shape, rank) >= math.prod(shape[-2:]) * math.prod(shape[:-2])
        out.append(Target(path, shape, lowrank=not (router or small), per_expert=id(p) in experts_ids))
    return out


class LoRAModule(nn.Module):
    """A frozen module `base` whose parameters `names` are used as W + scale * B @ A (module docstring).

    `base_tensor(name)` is the one place the frozen tensors are read from; assign `base_source` (a callable
    name -> tensor) to supply them from elsewhere (e.g. from disk, one layer at a time)."""

    def __init__(self, base: nn.Module, names: list[str], *, rank: int, alpha: float, generator: torch.Generator,
                 checkpoint: bool = True, device: torch.device | None = None):
        super().__init__()
        self.base = base
        self.names = list(names)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.checkpoint = checkpoint
        self.base_source = None
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            w = getattr(base, name)
            *lead, m, n = w.shape
            bound = 1 / math.sqrt(n)
            a = (torch.rand((*lead, rank, n), generator=generator, dtype=torch.float32) * 2 - 1) * bound
            dev = w.device if device is None else device  # a streamed base is on meta: the factors go to `device`
            self.lora_A[name] = nn.Parameter(a.to(dev))  # (..., R, n)
            self.lora_B[name] = nn.Parameter(torch.zeros((*lead, m, rank), dtype=torch.float32, device=dev))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)  # the block may read attributes of the module it calls

    def base_tensor(self, name: str) -> torch.Tensor:
        """The frozen tensor `name` (the resident parameter unless `base_source` is set)."""
        return getattr(self.base, name) if self.base_source is None else self.base_source(name)

    def effective(self, name: str) -> torch.Tensor:
        """W_eff = (W.float() + scale * (B @ A)).to(W.dtype): what the forward uses and what merging writes (one
        function for both, so merged weights equal the adapted ones bit for bit). Transient memory: a float32 copy
        of W and B @ A (8 B per element), plus W_eff in W's dtype."""
        w = self.base_tensor(name)
        delta = torch.matmul(self.lora_B[name], self.lora_A[name])  # (..., m, n) float32
        return w.to(torch.float32, copy=True).add_(delta, alpha=self.scale).to(w.dtype)

    def _run(self, *args, **kwargs):
        weights = {name: self.effective(name) for name in self.names}
        return torch.func.functional_call(self.base, weights, args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._run, *args, use_reentrant=False, **kwargs)
        return self._run(*args, **kwargs)


@dataclass
class _Wrapped:
    layer: int
    path: str  # of the wrapped module within the block ("" = the block itself)
    parent: nn.Module
    attr: str
    module: LoRAModule


class Adapters:
    """Adapters attached to a model's MoE blocks (attach_adapters)."""

    def __init__(self, adapter: MoEAdapter, wrapped: list[_Wrapped], full: dict, rank: int, alpha: float):
        self.adapter, self.wrapped, self.full, self.rank, self.alpha = adapter, wrapped, full, rank, alpha

    def trainable_parameters(self) -> dict[str, tuple[int, str, nn.Parameter]]:
        """'layer.path' -> (layer index, path, parameter): every factor ('PATH.lora_A' / 'PATH.lora_B', PATH the
        adapted tensor's path within the block) and every tensor trained fully (its own block path)."""
        out = dict(self.full)
        for w in self.wrapped:
            prefix = f"{w.path}." if w.path else ""
            for name in w.module.names:
                for kind in ("lora_A", "lora_B"):
                    path = f"{prefix}{name}.{kind}"
                    out[f"{w.layer}.{path}"] = (w.layer, path, getattr(w.module, kind)[name])
        return out

    def adapted_paths(self) -> list[str]:
        return sorted({(f"{w.path}." if w.path else "") + n for w in self.wrapped for n in w.module.names})

    def fully_trained_paths(self) -> list[str]:
        return sorted({path for _, path, _ in self.full.values()})

    @torch.no_grad()
    def merged_tensors(self) -> dict[int, dict[str, torch.Tensor]]:
        """Layer -> {block path: W_eff} for every adapted tensor, in the base tensor's dtype (read through
        `base_tensor`, so the base need not be resident)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for w in self.wrapped:
            prefix = f"{w.path}." if w.path else ""
            for name in w.module.names:
                out.setdefault(w.layer, {})[prefix + name] = w.module.effective(name)
        return out

    @torch.no_grad()
    def merge(self) -> dict[int, dict[str, torch.Tensor]]:
        """Write W_eff into the resident base parameters and remove the wrappers (the model is a stock model
        again); returns merged_tensors()."""
        merged = self.merged_tensors()
        for w in self.wrapped:
            prefix = f"{w.path}." if w.path else ""
            for name in w.module.names:
                getattr(w.module.base, name).copy_(merged[w.layer][prefix + name])
        self.detach()
        return merged

    def detach(self) -> None:
        """Put the original modules back (adapters discarded unless merged first)."""
        for w in self.wrapped:
            setattr(w.parent, w.attr, w.module.base)
        self.wrapped = []


def _parent(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    if not path:
        raise MoePruneError("recover.adapter: an MoE block owns an adapted tensor directly; wrap its experts instead")
    *head, attr = path.split(".")
    parent = block
    for part in head:
        parent = getattr(parent, part)
    return parent, attr


def attach_adapters(model, *, rank: int = DEFAULT_RANK, alpha: float | None = None, seed: int = 0,
                    checkpoint: bool = True, device: torch.device | None = None) -> Adapters:
    """Freeze every MoE-block tensor that gets low-rank factors and wrap its module (module docstring); returns
    the Adapters. `alpha` defaults to 2 x rank. The model's other parameters are left as they are. `device`: where
    the factors live when the base tensors are not resident (streamed from disk); default the base's device."""
    if rank < 1:
        raise MoePruneError(f"recover.rank: {rank} is not a rank; use a positive integer (e.g. {DEFAULT_RANK})")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    adapter = MoEAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    wrapped, full = [], {}
    for layer in adapter.layers:
        targets = adapter_targets(adapter, layer, rank)
        params = dict(layer.block.named_parameters())
        by_module: dict[str, list[str]] = {}
        for t in targets:
            if t.lowrank:
                mod, _, name = t.path.rpartition(".")
                by_module.setdefault(mod, []).append(name)
                params[t.path].requires_grad_(False)
            else:
                full[f"{layer.index}.{t.path}"] = (layer.index, t.path, params[t.path])
        for mod_path, names in by_module.items():
            parent, attr = _parent(layer.block, mod_path)
            module = LoRAModule(getattr(parent, attr), names, rank=rank, alpha=alpha, generator=gen,
                                checkpoint=checkpoint, device=device)
            setattr(parent, attr, module)
            wrapped.append(_Wrapped(layer.index, mod_path, parent, attr, module))
    if not wrapped and not full:
        raise MoePruneError(f"recover.adapter: {adapter.spec.name} has no MoE-block tensors to adapt")
    return Adapters(adapter, wrapped, full, rank, alpha)


def fully_trained(model, rank: int) -> dict[int, dict[str, nn.Parameter]]:
    """MoE layer -> {block path: parameter} of what `moe_kd` with adapters trains fully (routers, per-expert
    biases, ...): every MoE-block parameter without low-rank factors (on a model built on the meta device too)."""
    adapter = MoEAdapter(model)
    out: dict[int, dict[str, nn.Parameter]] = {}
    for layer in adapter.layers:
        params = dict(layer.block.named_parameters())
        out[layer.index] = {t.path: params[t.path] for t in adapter_targets(adapter, layer, rank) if not t.lowrank}
    return out


def fully_trained_parameters(model, rank: int) -> list[nn.Parameter]:
    """The parameters of fully_trained(), as one list."""
    return [p for params in fully_trained(model, rank).values() for p in params.values()]


def adapted_modules(model, rank: int) -> set[str]:
    """Names (in `model`) of the modules attach_adapters wraps: those owning a tensor that gets factors."""
    adapter = MoEAdapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for layer in adapter.layers:
        block = names[id(layer.block)]
        for t in adapter_targets(adapter, layer, rank):
            if t.lowrank:
                mod = t.path.rpartition(".")[0]
                out.add(f"{block}.{mod}" if mod else block)
    return out
