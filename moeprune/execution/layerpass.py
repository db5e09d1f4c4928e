"""A layer-by-layer pass over calibration batches for models that do not fit in memory.

The model is built without weights; the inputs of every decoder layer are captured once by the model's
own forward (see moeprune/execution/layers.py), then each decoder layer is loaded from the safetensors
files, every batch goes through it, and it is freed. `layerwise_search` runs the per-layer subset search
of the reconstruction methods on that pass; with `progressive` each layer's outputs are computed with
its experts already pruned (routing masks), so later layers see the pruned model, as in memory.
`block_pass` hands every MoE block's inputs to a visitor that may rewrite the block (surgery, recovery)
after the original layer's outputs have been passed on; the in-memory executor runs the same pass over
its loaded model, so both executors feed the visitor the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = ["layerwise_search", "LayerSource", "block_pass"]


class LayerSource:
    """The weightless model of a checkpoint plus a loader of its tensors, one layer at a time."""

    def __init__(self, src: Path, *, dtype: str, device: torch.device):
        from moeprune.execution.layers import _skeleton
        from moeprune.checkpoint.loader import WeightLoader
        from moeprune.checkpoint.names import CheckpointNames
        from moeprune.checkpoint.safetensors_io import Checkpoint

        self.src, self.device, self.dtype = src, device, getattr(torch, dtype)
        self.model = _skeleton(src, self.dtype)
        self.names = CheckpointNames(self.model)
        self.adapter = self.names.adapter
        self.loader = WeightLoader(Checkpoint(src), self.names)

    def layer_names(self, i: int, sub: str = "") -> list[str]:
        prefix = f"{self.adapter.spec.layers}.{i}." + (f"{sub}." if sub else "")
        return [k for k in self.model.state_dict(keep_vars=True) if k.startswith(prefix)]

    def load(self, names: list[str]) -> None:
        self.loader.materialise(self.model, names, self.device)

    def release(self, names: list[str]) -> None:
        self.loader.release(self.model, names)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fingerprint(self) -> str:
        """The digest `model_fingerprint` gives the loaded model, from the router tensors on disk alone."""
        import hashlib
        import json

        a = self.adapter
        h = hashlib.sha256()
        h.update(json.dumps([a.config.model_type, a.layer_indices, [layer.num_experts for layer in a.layers]]).encode())
        for layer in a.layers:
            name = f"{a.spec.layers}.{layer.index}.{a.spec.block}.{a.spec.router_tensors[0][0]}"
            w = self.loader.tensor(name).to(self.dtype)  # as the loaded model holds it
            h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.loader.close()


def _forward_all(layer, i: int, store, calls, batches, device, state: dict, *, write: bool) -> None:
    for b, (_, mask) in enumerate(batches):
        state["mask"] = mask.to(device).reshape(-1).bool()
        args, kwargs = calls[b][i]
        out = layer(store.get(b), *args, **kwargs)
        if write:
            store.put(b, out[0] if isinstance(out, tuple) else out)


def layerwise_search(src: Path, calibration, choose, *, dtype: str, device: torch.device, max_tokens: int,
                     progressive: bool = False, max_ram_bytes: int | None = None,
                     progress: bool = True) -> dict[int, list[int]]:
    """`moeprune.score.reconstruct.search_layers` one decoder layer at a time (same inputs, same result)."""
    from moeprune.score.reconstruct import masked_routing
    from moeprune.execution.layers import HiddenStore, _batches, _capture, _move_buffers, _outer_names

    source = LayerSource(src, dtype=dtype, device=device)
    model, adapter, spec = source.model, source.adapter, source.adapter.spec
    layers = model.get_submodule(spec.layers)
    batches = _batches(calibration)
    _move_buffers(model, device)
    store = HiddenStore(max_ram_bytes=max_ram_bytes, device=device)
    kept: dict[int, list[int]] = {}
    state: dict = {"mask": None}
    try:
        with torch.no_grad():
            outer = _outer_names(model, spec.layers, source.loader)
            source.load(outer)
            calls = _capture(model, layers, batches, device, store)
            source.release(outer)
            for i in tqdm(range(len(layers)), desc="subset search", unit="layer", disable=not progress):
                names = source.layer_names(i)
                source.load(names)
                if i not in adapter.layer_indices:
                    _forward_all(layers[i], i, store, calls, batches, device, state, write=True)
                else:
                    moe = adapter.layer(i)
                    seen = _forward_grabbing_block_inputs(moe, layers[i], i, store, calls, batches, device, state,
                                                          write=not progressive)
                    kept[i] = choose(adapter, moe, torch.cat(seen)[:max_tokens])
                    if progressive:
                        with masked_routing(adapter, {i: kept[i]}):
                            _forward_all(layers[i], i, store, calls, batches, device, state, write=True)
                source.release(names)
    finally:
        store.close()
        source.close()
    return kept


def _forward_grabbing_block_inputs(moe, layer, i, store, calls, batches, device, state, *, write: bool):
    """Forward every batch through decoder layer i, returning the MoE block's inputs per batch as
    (non-padding tokens, H) float32 CPU tensors."""
    seen: list[torch.Tensor] = []

    def grab(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.reshape(-1, h.shape[-1])[state["mask"]].detach().float().cpu())

    handle = moe.block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _forward_all(layer, i, store, calls, batches, device, state, write=write)
    finally:
        handle.remove()
    return seen


def block_pass(model, batches, visit, *, device: torch.device, source: LayerSource | None = None,
               max_ram_bytes: int | None = None, progress: bool = True, desc: str = "recovery") -> None:
    """One pass over the decoder layers of `model` (a loaded model, or `source`'s weightless one, loaded
    layer by layer) with the original weights: for every MoE layer, `visit(adapter, layer, inputs)` gets
    the block's inputs as a list per batch of (non-padding tokens, H) float32 CPU tensors, after the
    layer's outputs were stored for the next layer, so the visitor may change the block in place."""
    from moeprune.models import MoEAdapter
    from moeprune.execution.layers import HiddenStore, _batches, _capture, _move_buffers, _outer_names

    adapter = source.adapter if source is not None else MoEAdapter(model)
    layers = model.get_submodule(adapter.spec.layers)
    batches = _batches(batches)
    if source is not None:
        _move_buffers(model, device)
    store = HiddenStore(max_ram_bytes=max_ram_bytes, device=device)
    state: dict = {"mask": None}
    try:
        with torch.no_grad():
            if source is not None:
                outer = _outer_names(model, adapter.spec.layers, source.loader)
                source.load(outer)
            calls = _capture(model, layers, batches, device, store)
            if source is not None:
                source.release(outer)
            for i in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
                names = source.layer_names(i) if source is not None else []
                if source is not None:
                    source.load(names)
                if i not in adapter.layer_indices:
                    _forward_all(layers[i], i, store, calls, batches, device, state, write=True)
                else:
                    moe = adapter.layer(i)
                    seen = _forward_grabbing_block_inputs(moe, layers[i], i, store, calls, batches, device, state,
                                                          write=True)
                    visit(adapter, moe, seen)
                if source is not None:
                    source.release(names)
    finally:
        store.close()
