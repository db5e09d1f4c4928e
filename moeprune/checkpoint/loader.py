"""Load chosen parameters of a model from its safetensors files, in the model's in-memory layout.

The on-disk names are the hub layout; each in-memory name is gathered from the on-disk tensors that
transformers' conversion table renames to it, and converted with the table's own operations
(`MergeModulelist` stacks experts, `Concatenate` joins gate and up). Parameters are placed into a model
built without weights (`accelerate.init_empty_weights`) with `set_module_tensor_to_device`, and put back
on the meta device when done, so only the part being worked on occupies memory.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from moeprune.errors import MoePruneError
from moeprune.checkpoint.names import CheckpointNames
from moeprune.checkpoint.safetensors_io import TORCH_DTYPES, Checkpoint

__all__ = ["WeightLoader"]


class WeightLoader:
    """Builds in-memory tensors of `model` (on meta) from the checkpoint `ckpt`."""

    def __init__(self, ckpt: Checkpoint, names: CheckpointNames):
        self.ckpt, self.names = ckpt, names
        # in-memory name -> [(converter source pattern or None, expert index, on-disk name)]
        self.sources: dict[str, list[tuple[str | None, int, str]]] = defaultdict(list)
        for disk in ckpt.tensors:
            memory, pattern = names.memory_name(disk)
            expert = names.expert_index(disk, pattern) if pattern is not None and "*" in pattern else 0
            self.sources[memory].append((pattern, expert, disk))

    def close(self) -> None:
        """Nothing to release: tensors are read with positioned reads, no file stays open or mapped."""

    def _read(self, disk: str) -> torch.Tensor:
        return self.ckpt.load(disk)

    def tensor(self, name: str) -> torch.Tensor:
        """The in-memory tensor `name` as the stock loader would build it."""
        entries = self.sources.get(name)
        if not entries:
            raise MoePruneError(f"{self.ckpt.folder}: no tensor in the checkpoint loads into {name}")
        pattern = entries[0][0]
        if pattern is None:
            if len(entries) != 1:
                raise MoePruneError(f"{self.ckpt.folder}: several tensors load into {name}: {[e[2] for e in entries]}")
            return self._read(entries[0][2])
        conv = self.names.converter_of[pattern]
        if len(conv.target_patterns) != 1:
            raise MoePruneError(f"{name}: one-to-many conversions ({conv}) are not supported by layer-wise loading")
        stacked = _stacks_first(conv)
        collected: dict = {}
        for p in conv.source_patterns:
            group = sorted((e for e in entries if e[0] == p), key=lambda e: e[1])
            if group:
                collected[p] = self._stacked(group) if stacked else [self._read(disk) for _, _, disk in group]
        for op in conv.operations:
            collected = op.convert(collected, source_patterns=conv.source_patterns,
                                   target_patterns=conv.target_patterns, config=self.names.adapter.config)
        (value,) = collected.values()
        return value

    def _stacked(self, group: list[tuple]) -> torch.Tensor | list[torch.Tensor]:
        """Experts 0..E-1 of one source pattern read straight into their slots of one (E, ...) tensor: what
        `MergeModulelist(dim=0)` would stack, without the per-expert copies (it passes a stacked tensor
        through as it is). A plain list when the group is not experts 0..E-1 of one shape and dtype."""
        infos = [self.ckpt.tensors[disk] for _, _, disk in group]
        first = infos[0]
        dtype = getattr(torch, TORCH_DTYPES.get(first.dtype, ""), None)
        if (dtype is None or [expert for _, expert, _ in group] != list(range(len(group)))
                or any((i.dtype, tuple(i.shape)) != (first.dtype, tuple(first.shape)) for i in infos)):
            return [self._read(disk) for _, _, disk in group]
        out = torch.empty((len(infos), *first.shape), dtype=dtype)
        for j, info in enumerate(infos):
            self.ckpt.load(info.name, out=out[j])
        return out

    def materialise(self, model: nn.Module, names: list[str], device: torch.device) -> None:
        """Load `names` (in-memory parameter/buffer names) into `model` on `device`."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            value = self.tensor(name)
            old = model.get_parameter(name) if _is_param(model, name) else model.get_buffer(name)
            if tuple(value.shape) != tuple(old.shape):
                raise MoePruneError(f"{name}: the checkpoint gives shape {list(value.shape)}, the model expects "
                                    f"{list(old.shape)}")
            set_module_tensor_to_device(model, name, device, value=value)

    @staticmethod
    def release(model: nn.Module, names: list[str]) -> None:
        """Put `names` back on the meta device (frees their memory)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(model, name, "meta")
        trim_heap()


def _stacks_first(conv) -> bool:
    """Whether the converter's first operation stacks experts along dim 0 (and accepts a stacked tensor)."""
    from transformers.core_model_loading import MergeModulelist

    ops = list(conv.operations)
    return bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed tensors' pages otherwise, which makes a
    layer-by-layer pass grow by the fragmentation of every layer); a no-op where malloc_trim is missing."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _is_param(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in module._parameters
