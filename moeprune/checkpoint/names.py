"""On-disk tensor names -> their in-memory parameter and their role in expert surgery.

`save_pretrained` writes the hub layout (e.g. Mixtral `block_sparse_moe.experts.{j}.w1.weight`), while the
model in memory holds fused `mlp.experts.gate_up_proj` (E, 2I, H). The mapping between the two is
transformers' own conversion table (`transformers.conversion_mapping`): renamings plus converters whose
source patterns carry a `*` where the expert index goes and whose `MergeModulelist` stacks experts along
dim 0. Nothing here is per architecture: names come from that table and from the `ArchSpec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter

__all__ = ["TensorRole", "CheckpointNames"]

@dataclass(frozen=True)
class TensorRole:
    """What expert surgery does to one on-disk tensor.

    kind: "copy" (untouched), "expert" (one expert's tensor in the hub per-expert layout: kept and
        renumbered, or dropped), "fused" (all experts stacked on disk: index dim 0), "router" (one entry
        per expert along `dim`: weight rows, bias, correction bias).
    memory_name: the model parameter/buffer the tensor loads into.
    layer: decoder-layer index (MoE layers only). expert: the index in the name ("expert" only);
    span: its character span in the on-disk name. pattern: the converter source pattern that matched.
    """

    kind: Literal["copy", "expert", "fused", "router"]
    memory_name: str
    layer: int | None = None
    expert: int | None = None
    span: tuple[int, int] | None = None
    dim: int = 0
    pattern: str | None = None

    def renamed(self, disk_name: str, new_index: int) -> str:
        """The on-disk name with the expert index replaced (kept experts are renumbered 0..n-1)."""
        a, b = self.span
        return f"{disk_name[:a]}{new_index}{disk_name[b:]}"


def _index_regex(pattern: str) -> re.Pattern:
    if pattern.count("*") != 1:
        raise MoePruneError(f"conversion pattern {pattern!r} does not have exactly one expert index '*'")
    head, tail = pattern.lstrip("^").split("*")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"(?!\w)")


class CheckpointNames:
    """Classifies on-disk tensor names of one model (built on the meta device) for surgery and loading."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        self.adapter = MoEAdapter(model)
        spec = self.adapter.spec
        transforms = get_model_conversion_mapping(model)
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.converter_of = {p: c for c in self.converters for p in c.source_patterns}
        self._index_re: dict[str, re.Pattern] = {}
        self._block_re = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.{re.escape(spec.block)}\.(.+)$")
        self.expert_paths = {f"{spec.experts}.{t}" for t in spec.layout.tensors}
        self.router_paths = dict(spec.router_tensors)
        self.moe_layers = set(self.adapter.layer_indices)

    def memory_name(self, disk_name: str) -> tuple[str, str | None]:
        """(in-memory name, matching converter source pattern or None), as transformers renames on load."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(disk_name, self.renamings, self.converters)

    def role(self, disk_name: str) -> TensorRole:
        memory, pattern = self.memory_name(disk_name)
        m = self._block_re.match(memory)
        if m is None or int(m.group(1)) not in self.moe_layers:
            return TensorRole("copy", memory, pattern=pattern)
        layer, rest = int(m.group(1)), m.group(2)
        if rest in self.router_paths:
            if pattern is not None:
                raise self._refuse(disk_name, "router tensors are converted on load")
            return TensorRole("router", memory, layer=layer, dim=self.router_paths[rest])
        if rest in self.expert_paths:
            if pattern is None:
                return TensorRole("fused", memory, layer=layer, dim=0)
            return self._expert_role(disk_name, memory, layer, pattern)
        if rest.startswith(f"{self.adapter.spec.experts}."):
            raise self._refuse(disk_name, f"{memory} is an unknown per-expert tensor")
        return TensorRole("copy", memory, layer=layer, pattern=pattern)

    def _expert_role(self, disk_name: str, memory: str, layer: int, pattern: str) -> TensorRole:
        from transformers.core_model_loading import Concatenate, MergeModulelist

        ops = self.converter_of[pattern].operations
        merges = [op for op in ops if isinstance(op, MergeModulelist)]
        if len(merges) != 1 or merges[0].dim != 0 or not all(isinstance(op, (MergeModulelist, Concatenate))
                                                              for op in ops):
            raise self._refuse(disk_name, f"its conversion ({[type(op).__name__ for op in ops]}) is not a stack "
                                          "of per-expert tensors")
        regex = self._index_regex(pattern)
        found = list(regex.finditer(disk_name))
        if len(found) != 1:
            raise self._refuse(disk_name, f"cannot find the expert index of pattern {pattern!r} in it")
        return TensorRole("expert", memory, layer=layer, expert=int(found[0].group(1)), span=found[0].span(1),
                          pattern=pattern)

    def expert_index(self, disk_name: str, pattern: str) -> int:
        """The expert index that `pattern`'s `*` matches in `disk_name`."""
        m = self._index_regex(pattern).search(disk_name)
        if m is None:
            raise self._refuse(disk_name, f"cannot find the expert index of pattern {pattern!r} in it")
        return int(m.group(1))

    def _index_regex(self, pattern: str) -> re.Pattern:
        if pattern not in self._index_re:
            self._index_re[pattern] = _index_regex(pattern)
        return self._index_re[pattern]

    def _refuse(self, disk_name: str, why: str) -> MoePruneError:
        spec = self.adapter.spec
        return MoePruneError(f"streaming surgery does not understand the on-disk layout of {spec.name} "
                             f"({self.adapter.config.model_type}) tensor {disk_name}: {why}; use the in-memory "
                             "`moeprune prune` instead")
