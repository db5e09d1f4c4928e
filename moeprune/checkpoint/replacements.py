"""Tensors that compression rewrote (merged experts, merged router rows), kept on disk until the output
checkpoint is written, so that memory holds at most one layer of them whatever the model's size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

__all__ = ["Replacements", "to_disk_names", "changed_tensors", "block_tensors_on_disk"]

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def to_disk_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors (fused experts, router rows) under the names and layout the checkpoint stores,
    by transformers' own conversion table run in reverse (the inverse of what loading does)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


class Replacements:
    """on-disk tensor name -> replacement tensor, spilled to one safetensors file per `add` (a later `add` of
    the same name replaces the earlier one)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="moeprune-replaced-")
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._adds = 0

    def add(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = Path(self._dir.name) / f"layer-{layer}-{self._adds}.safetensors"
        self._adds += 1
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        for name, t in tensors.items():
            self._where[name] = path
            self._shapes[name] = tuple(t.shape)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._where[name], framework="pt") as f:
            return f.get_tensor(name)

    def bytes_as(self, name: str, st_dtype: str):
        """A callable giving the replacement's bytes in the on-disk dtype `st_dtype` (e.g. "BF16")."""
        target = {v: k for k, v in _ST_DTYPES.items()}.get(st_dtype)

        def make() -> bytes:
            t = self.load(name)
            if target is not None:
                t = t.to(target)
            return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

        return make

    def close(self) -> None:
        self._dir.cleanup()


def changed_tensors(plan, adapter, layer, decision, names) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor for what a method rewrote in one loaded layer (merged experts, merged
    router rows), in the compressed layout (kept experts renumbered 0..n-1)."""
    changed = decision.changed_experts(layer.index)
    router = plan.method.changed_router(plan) and bool(changed)
    if not changed:
        return {}
    spec = adapter.spec
    kept = decision.kept[layer.index]
    idx = torch.tensor(kept, dtype=torch.long)
    prefix = f"{spec.layers}.{layer.index}.{spec.block}"
    mem = {f"{prefix}.{spec.experts}.{t}": getattr(layer.experts, t).detach().index_select(0, idx.to(
        getattr(layer.experts, t).device)) for t in spec.layout.tensors}
    if router:
        for path, dim in spec.router_tensors:
            t = adapter.tensor(layer, path).detach()
            mem[f"{prefix}.{path}"] = t.index_select(dim, idx.to(t.device))
    new_index = {kept.index(j) for j in changed}
    out = {}
    for name, t in to_disk_names(plan.shape.model, mem).items():
        role = names.role(name)
        if role.kind == "expert" and role.expert not in new_index:
            continue  # untouched expert: copied byte for byte from the source
        if role.kind == "router" and not router:
            continue
        out[name] = t
    return out


def block_tensors_on_disk(plan, layers: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Layer -> {path within the MoE block: tensor} of the compressed model -> layer -> {on-disk name: tensor},
    in the checkpoint's names and layout (experts renumbered 0..n-1)."""
    spec = plan.shape.spec
    return {i: to_disk_names(plan.shape.model, {f"{spec.layers}.{i}.{spec.block}.{path}": t
                                                for path, t in tensors.items()})
            for i, tensors in layers.items()}
