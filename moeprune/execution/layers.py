"""Layer-wise observation: router/expert statistics of a model that does not fit in memory.

The model is built without weights. One cheap pass per batch runs the model's own forward with every
decoder layer replaced by a recorder, which captures exactly what the model would hand each layer
(hidden states entering layer 0, attention masks per layer type, rotary embeddings, position ids) and
stops before the final norm. Then each decoder layer in turn is loaded from the safetensors files, every
calibration batch goes through it (hidden states kept in memory, or spilled to disk as safetensors past
a budget) with moeprune's `Collector` attached, and the layer is freed. Peak memory is one decoder layer
plus the embedding plus the hidden states of the calibration set.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from moeprune import distributed
from moeprune.errors import MoePruneError
from moeprune.observe import Collector, Observations
from moeprune.checkpoint.loader import WeightLoader
from moeprune.checkpoint.names import CheckpointNames
from moeprune.checkpoint.safetensors_io import Checkpoint

__all__ = ["observe_layerwise", "HiddenStore", "default_device"]


def default_device() -> torch.device:
    """CUDA when available (this rank's GPU under torchrun), else CPU."""
    return distributed.context().device


class HiddenStore:
    """Per-batch hidden states, kept on the device until `max_ram_bytes`, then spilled to safetensors files."""

    def __init__(self, *, max_ram_bytes: int | None = None, device: torch.device):
        self.max_ram_bytes, self.device = max_ram_bytes, device
        self._ram: dict[int, torch.Tensor] = {}
        self._ram_bytes = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self.spilled = 0

    def put(self, i: int, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        old = self._ram.pop(i, None)
        self._ram_bytes -= 0 if old is None else old.nbytes
        if self.max_ram_bytes is None or self._ram_bytes + t.nbytes <= self.max_ram_bytes:
            self._ram[i] = t
            self._ram_bytes += t.nbytes
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="moeprune-hidden-")
        save_file({"h": t.detach().contiguous().cpu()}, Path(self._dir.name) / f"{i}.safetensors")
        self.spilled += 1

    def get(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if i in self._ram:
            return self._ram[i]
        return load_file(Path(self._dir.name) / f"{i}.safetensors")["h"].to(self.device)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
        self._ram.clear()


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


def _skeleton(src: Path, dtype: torch.dtype):
    """The causal LM with parameters on the meta device and real (computed) buffers such as rotary tables."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moeprune.checkpoint.model_dir import load_config
    from moeprune.models import get_arch_spec

    config = load_config(src)
    get_arch_spec(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                module._buffers[name] = buf.to(device)


def _capture(model, layers: nn.ModuleList, batches, device, store: HiddenStore) -> list[list[tuple]]:
    """Per batch and layer, the (args, kwargs) the model passes the layer; the hidden states entering
    layer 0 go into `store`."""
    calls: list[tuple] = []

    def recorder(is_last: bool):
        def forward(_self, *args, **kwargs):
            calls.append((args[1:], kwargs))
            if is_last:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        return forward

    per_batch: list[list[tuple]] = []
    for i, layer in enumerate(layers):
        layer.forward = types.MethodType(recorder(i == len(layers) - 1), layer)
    first = layers[0]
    grab = first.register_forward_pre_hook(
        lambda _m, a, k: store.put(len(per_batch), a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        for ids, mask in batches:
            calls.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
            if len(calls) != len(layers):
                raise MoePruneError(f"the model called {len(calls)} of its {len(layers)} decoder layers")
            per_batch.append([(args, {k: v for k, v in kw.items() if k != "hidden_states"}) for args, kw in calls])
    finally:
        grab.remove()
        for layer in layers:
            del layer.forward
    return per_batch


def _names_under(model: nn.Module, prefix: str) -> list[str]:
    return [k for k in model.state_dict(keep_vars=True) if k.startswith(prefix)]


def _batches(calibration) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in getattr(calibration, "batches", calibration):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        out.append((ids, torch.ones_like(ids) if mask is None else mask))
    if not out:
        raise MoePruneError("calibration set is empty: give at least one calibration sample")
    return out


def _outer_names(model, layers_prefix: str, loader: WeightLoader) -> list[str]:
    """Parameters outside the decoder layers that the forward reads before them (not the output head)."""
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_ids -= {id(p) for p in model.get_input_embeddings().parameters()}  # tied: the embedding is needed
    state = model.state_dict(keep_vars=True)
    return [k for k, v in state.items() if not k.startswith(layers_prefix + ".") and id(v) not in head_ids
            and k in loader.sources]


def observe_layerwise(model_dir: str | Path, calibration, *, collect: Iterable[str] = (),
                      all_means_tokens: int | None = None, device: str | torch.device | None = None,
                      dtype: str = "float32", max_ram_bytes: int | None = None, progress: bool = True) -> Observations:
    """`observe` for checkpoints larger than memory: the same `Observations`, one decoder layer at a time.

    Args:
        model_dir: a local model folder with safetensors weights.
        calibration: a CalibrationSet or any iterable of batches with `input_ids` and optional
            `attention_mask` (padding excluded from the statistics).
        device: where layers run (default: CUDA when available, else CPU).
        dtype: compute dtype of the weights ("float32", "bfloat16", "float16").
        max_ram_bytes: hidden states beyond this many bytes are spilled to a temporary folder.
    """
    from tqdm.auto import tqdm

    from moeprune.checkpoint.model_dir import resolve_model_dir

    start = time.perf_counter()
    src = resolve_model_dir(model_dir)
    device = torch.device(device) if device is not None else default_device()
    model = _skeleton(src, getattr(torch, dtype))
    names = CheckpointNames(model)
    adapter, spec = names.adapter, names.adapter.spec
    loader = WeightLoader(Checkpoint(src), names)
    layers = adapter.model.get_submodule(spec.layers)
    batches = distributed.shard(_batches(calibration))  # this rank's share (all of them in one process)
    _move_buffers(model, device)
    outer = _outer_names(model, spec.layers, loader)
    store = HiddenStore(max_ram_bytes=max_ram_bytes, device=device)
    collector = Collector(model, collect=collect, all_means_tokens=all_means_tokens)
    fingerprint = hashlib.sha256(json.dumps([model.config.model_type, adapter.layer_indices,
                                             [layer.num_experts for layer in adapter.layers]]).encode())
    try:
        with torch.no_grad():
            loader.materialise(model, outer, device)
            calls = _capture(model, layers, batches, device, store)
            loader.release(model, outer)
            with collector:
                for i in tqdm(range(len(layers)), desc="layers", unit="layer", disable=not progress):
                    _run_layer(model, i, loader=loader, store=store, calls=calls, batches=batches,
                               collector=collector, fingerprint=fingerprint, device=device)
    finally:
        store.close()
        loader.close()
    meta = _meta(model, src, collector, calibration, batches, fingerprint=fingerprint.hexdigest()[:16],
                 all_means_tokens=all_means_tokens, seconds=time.perf_counter() - start, device=device,
                 spilled=store.spilled)
    return distributed.reduce_observations(Observations(layers=collector.stats(), meta=meta))


def _meta(model, src: Path, collector: Collector, calibration, batches, *, fingerprint: str,
          all_means_tokens: int | None, seconds: float, device, spilled: int) -> dict:
    """The metadata `observe` records, plus how the layer-wise pass ran."""
    from moeprune import __version__

    adapter = collector.adapter
    describe = calibration.describe() if hasattr(calibration, "describe") else {"batches": len(batches)}
    return {
        "moeprune_version": __version__, "model_type": model.config.model_type, "architecture": adapter.spec.name,
        "model_fingerprint": fingerprint, "model_path": str(src), "moe_layers": adapter.layer_indices,
        "num_experts": {str(layer.index): layer.num_experts for layer in adapter.layers},
        "top_k": adapter.top_k, "num_tokens": sum(int(mask.sum()) for _, mask in batches),
        "collected": sorted(collector.collect), "all_means_tokens": all_means_tokens, "calibration": describe,
        "seconds": round(seconds, 3), "layerwise": True, "device": str(device), "spilled_batches": spilled,
    }


def _run_layer(model, i: int, *, loader: WeightLoader, store: HiddenStore, calls, batches, collector: Collector,
               fingerprint, device) -> None:
    """Load decoder layer i, run every batch through it (statistics collected), free it."""
    adapter, spec = collector.adapter, collector.adapter.spec
    layer = model.get_submodule(spec.layers)[i]
    names = _names_under(model, f"{spec.layers}.{i}.")
    loader.materialise(model, names, device)
    if i in adapter.layer_indices:
        # the same digest as `model_fingerprint`: router weights in layer order, as float32 bytes
        w = adapter.tensor(adapter.layer(i), spec.router_tensors[0][0])
        fingerprint.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    for b, (_, mask) in enumerate(batches):
        collector.set_mask(mask.to(device))
        args, kwargs = calls[b][i]
        out = layer(store.get(b), *args, **kwargs)
        store.put(b, out[0] if isinstance(out, tuple) else out)
    collector.token_mask = None
    loader.release(model, names)
    if device.type == "cuda":
        torch.cuda.empty_cache()
