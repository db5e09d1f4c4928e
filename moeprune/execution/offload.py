"""Evaluation of models larger than memory: the causal LM with its decoder layers read on every forward.

`offloaded_model` builds the model on the meta device, loads what every forward needs first (the input
embedding, the final norm, computed buffers such as rotary tables) onto the device, and gives each
decoder layer (and an untied output head) an accelerate `AlignDevicesHook` whose weights map reads the
layer's tensors from the original safetensors files through `WeightLoader` (in the model's in-memory
layout, converted by transformers' own table) just before the layer runs, and puts them back on the
meta device right after. Peak memory is the resident part plus one decoder layer (or the head), so
`moeprune.evaluate.evaluate` (perplexity and generation) runs unchanged on models of any size, at the
price of reading the weights once per forward call. With `max_memory`, half of it is the model's: the
resident part, room for the streamed layer and its conversion copies (3 x the largest layer), and the
leading decoder layers that fit in the rest stay resident (fewer reads); the other half is left for
activations and the allocator.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.checkpoint.loader import WeightLoader, trim_heap
from moeprune.checkpoint.names import CheckpointNames
from moeprune.checkpoint.safetensors_io import Checkpoint

__all__ = ["offloaded_model", "LazyWeights"]


class LazyWeights(Mapping):
    """In-memory parameter name -> tensor, read from the checkpoint on every access (tied names resolved)."""

    def __init__(self, loader: WeightLoader, aliases: dict[str, str]):
        self.loader, self.aliases = loader, aliases

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.loader.tensor(self.aliases.get(name, name))

    def __contains__(self, name) -> bool:
        return self.aliases.get(name, name) in self.loader.sources

    def __iter__(self) -> Iterator[str]:
        yield from self.loader.sources
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.loader.sources) + len(self.aliases)


def _hook_class():
    from accelerate.hooks import AlignDevicesHook

    class StreamedWeightsHook(AlignDevicesHook):
        """accelerate's offload hook, returning the freed weights' heap to the system after each call."""

        def post_forward(self, module, output):
            output = super().post_forward(module, output)
            trim_heap()
            return output

    return StreamedWeightsHook


def _aliases(model: nn.Module, loader: WeightLoader) -> dict[str, str]:
    """Tied parameter names absent from the checkpoint -> the tied name it stores."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out: dict[str, str] = {}
    for group in groups.values():
        stored = [n for n in group if n in loader.sources]
        if stored:
            out.update({n: stored[0] for n in group if n not in loader.sources})
    return out


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point tied names at the (now real) parameter their stored twin was loaded into."""
    for name, target in aliases.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[leaf] = model.get_parameter(target)


def _nbytes(model: nn.Module, names: list[str]) -> int:
    state = model.state_dict(keep_vars=True)
    return sum(state[n].numel() * state[n].element_size() for n in names)


def _resolve_dtype(src: Path, dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from moeprune.checkpoint import checkpoint_dtype

        dtype = checkpoint_dtype(src)
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise MoePruneError(f"dtype: {dtype!r} is not a floating dtype; use auto, float32, bfloat16 or float16")
    return value


def _budget(max_memory) -> int | None:
    from moeprune.units import parse_memory

    return parse_memory(max_memory)


def weightless_model(src: Path, dtype, device: torch.device):
    """The causal LM of the model folder `src` without weights (computed buffers on `device`, tied head tied),
    a loader of its tensors, its tied-name aliases and its ArchSpec: where streamed models start."""
    from moeprune.execution.layers import _move_buffers, _skeleton

    # accelerate's hooks make every hooked module reference itself: a dropped offloaded model is freed only by
    # the cycle collector, so collect before building the next one (the base model before the compressed one)
    gc.collect()
    model = _skeleton(src, _resolve_dtype(src, dtype))
    model.tie_weights()  # as from_pretrained does: a tied head shares the embedding (stored once)
    names = CheckpointNames(model)
    loader = WeightLoader(Checkpoint(src), names)
    _move_buffers(model, device)
    return model, loader, _aliases(model, loader), names.adapter.spec


def offloaded_model(model_dir: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                    max_memory: int | str | None = None) -> nn.Module:
    """The causal LM of MODEL_DIR for evaluation with its decoder layers streamed from the safetensors files.

    Args:
        model_dir: a local model folder with safetensors weights (never modified).
        dtype: compute dtype ("auto" = the checkpoint's own).
        device: where every module runs (default: CUDA when available, else CPU); inputs go there too.
        max_memory: bytes (or "2GB"); leading decoder layers stay resident while half of it still holds the
            resident part plus 3 x the largest layer. None: every decoder layer is streamed.

    Returns the model in eval mode; use it like a loaded one (`model(...)`, `generate`, `evaluate`).
    """
    from moeprune.checkpoint.model_dir import resolve_model_dir
    from moeprune.execution.layers import _outer_names, default_device

    src = resolve_model_dir(model_dir)
    device = torch.device(device) if device is not None else default_device()
    model, loader, aliases, spec = weightless_model(src, dtype, device)
    resident = _outer_names(model, spec.layers, loader)
    loader.materialise(model, resident, device)
    _retie(model, aliases)
    weights = LazyWeights(loader, aliases)
    budget = _budget(max_memory)
    layers = model.get_submodule(spec.layers)
    state = model.state_dict(keep_vars=True)
    per_layer = [[k for k in state if k.startswith(f"{spec.layers}.{i}.")] for i in range(len(layers))]
    largest = max(_nbytes(model, names) for names in per_layer)
    # half of max_memory for the model: the resident part, then the streamed layer with its conversion
    # copies (3 x the largest layer); what is left holds leading layers resident
    room = None if budget is None else budget // 2 - _nbytes(model, resident) - 3 * largest
    for i, layer in enumerate(layers):
        prefix, layer_names = f"{spec.layers}.{i}.", per_layer[i]
        size = _nbytes(model, layer_names)
        if room is not None and size <= room:
            loader.materialise(model, layer_names, device)
            room -= size
        else:
            room = None  # resident layers are a prefix: the rest stream
            _stream(layer, weights, prefix, device)
    head = model.get_output_embeddings()
    if head is not None and any(p.device.type == "meta" for p in head.parameters()):
        head_name = next(n for n, m in model.named_modules() if m is head)
        _stream(head, weights, f"{head_name}.", device)
    _check_complete(model, src)
    _generation_config(model, src)
    model.moeprune_offloaded = {"device": str(device), "layers_streamed": sum(
        hasattr(layer, "_hf_hook") for layer in model.get_submodule(spec.layers))}
    return model


def _stream(module: nn.Module, weights: LazyWeights, prefix: str, device: torch.device) -> None:
    from accelerate.hooks import add_hook_to_module
    from accelerate.utils import PrefixedDataset

    hook = _hook_class()(execution_device=device, offload=True, io_same_device=False, offload_buffers=True,
                         weights_map=PrefixedDataset(weights, prefix), place_submodules=True)
    add_hook_to_module(module, hook)


def _check_complete(model: nn.Module, src: Path) -> None:
    """Every tensor still on meta must belong to a streamed module."""
    streamed = [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.device.type == "meta" and not any(n.startswith(s + ".") for s in streamed)]
    if missing:
        raise MoePruneError(f"{src}: the checkpoint has no tensor for {missing[:3]} (of {len(missing)}); "
                            "it does not match its config.json")


def _generation_config(model: nn.Module, src: Path) -> None:
    """The folder's generation_config.json, as `from_pretrained` would read it."""
    if (src / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src)
