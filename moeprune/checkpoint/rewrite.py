"""Out-of-core expert pruning: rewrite a safetensors checkpoint shard by shard, never loading the model.

Every on-disk tensor is classified by `CheckpointNames` (transformers' conversion table + the
`ArchSpec`): per-expert hub tensors of dropped experts are skipped and kept ones renamed to 0..n-1;
fused on-disk expert tensors and router rows/biases are sliced along their expert dim; everything else is
copied byte for byte. Output shapes are known from the headers alone, so each output shard is written
header first and then one tensor at a time (kernel-side byte copies), holding at most one small tensor
in memory. The keep plan is validated against the model built on the meta device before anything is
written; the output folder appears atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.checkpoint.names import CheckpointNames, TensorRole
from moeprune.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, Checkpoint, OutTensor, TensorInfo, write_shard

__all__ = ["RewriteResult", "plan_rewrite", "prune_checkpoint", "write_rewrite", "parse_size"]

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "100KB", "2GiB" (the plan's parser, one unit table)."""
    from moeprune.units import parse_memory

    return parse_memory(size, field_name="max_shard_size")


@dataclass
class RewriteResult:
    """What a streaming rewrite wrote."""

    out_dir: Path
    kept: dict[int, list[int]]
    bytes_before: int
    bytes_after: int
    tensors_written: int
    shards: int
    seconds: float


def _rows(info: TensorInfo, dim: int, idx: list[int]) -> list[tuple[int, int]]:
    """Byte ranges of the kept rows of a tensor sliced along dim 0, adjacent rows merged."""
    assert dim == 0
    row = info.nbytes // info.shape[0]
    ranges: list[tuple[int, int]] = []
    for j in idx:
        b, e = info.begin + j * row, info.begin + (j + 1) * row
        if ranges and ranges[-1][1] == b:
            ranges[-1] = (ranges[-1][0], e)
        else:
            ranges.append((b, e))
    return ranges


def _select(ckpt: Checkpoint, info: TensorInfo, dim: int, idx: list[int]):
    def make() -> bytes:
        import torch

        t = ckpt.load(info.name).index_select(dim, torch.tensor(idx, dtype=torch.long)).contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return make


def _sliced(ckpt: Checkpoint, info: TensorInfo, role: TensorRole, idx: list[int], n_before: int) -> OutTensor:
    if info.shape[role.dim] != n_before:
        raise MoePruneError(f"{info.name}: expected {n_before} experts along dim {role.dim}, the checkpoint has "
                            f"shape {list(info.shape)}")
    shape = tuple(len(idx) if d == role.dim else s for d, s in enumerate(info.shape))
    if role.dim == 0:
        return OutTensor(info.name, info.dtype, shape, info, ranges=_rows(info, 0, idx))
    return OutTensor(info.name, info.dtype, shape, info, make=_select(ckpt, info, role.dim, idx))


def _replaced(t: OutTensor, replacements) -> OutTensor:
    """`t` with its bytes taken from `replacements` (merged or trained tensors) when it is one of them."""
    if replacements is None or t.name not in replacements:
        return t
    if tuple(replacements.shape(t.name)) != tuple(t.shape):
        raise MoePruneError(f"{t.name}: the rewritten tensor has shape {list(replacements.shape(t.name))}, the "
                            f"checkpoint expects {list(t.shape)}")
    return OutTensor(t.name, t.dtype, t.shape, t.source, make=replacements.bytes_as(t.name, t.dtype))


def plan_rewrite(ckpt: Checkpoint, names: CheckpointNames, plan: Mapping[int, Sequence[int]],
                 replacements=None) -> list[OutTensor]:
    """The output tensors (in source order) of keeping `plan[layer]` experts in every MoE layer; tensors
    named in `replacements` (on-disk names after renumbering) take their bytes from there."""
    n_before = {layer.index: layer.num_experts for layer in names.adapter.layers}
    out: list[OutTensor] = []
    seen: dict[tuple[int, str], set[int]] = defaultdict(set)
    sliced_layers: set[int] = set()
    for info in ckpt.tensors.values():
        role = names.role(info.name)
        if role.kind == "copy":  # replaced only by recovery that trains shared experts (moe_kd)
            out.append(_replaced(OutTensor(info.name, info.dtype, info.shape, info, ranges=[(info.begin, info.end)]),
                                 replacements))
        elif role.kind == "expert":
            seen[(role.layer, role.pattern)].add(role.expert)
            kept = plan[role.layer]
            if role.expert in kept:
                new = role.renamed(info.name, kept.index(role.expert))
                out.append(_replaced(OutTensor(new, info.dtype, info.shape, info, ranges=[(info.begin, info.end)]),
                                     replacements))
        else:
            if role.kind == "fused":
                sliced_layers.add(role.layer)
            out.append(_replaced(_sliced(ckpt, info, role, list(plan[role.layer]), n_before[role.layer]),
                                 replacements))
    for (layer, pattern), found in seen.items():
        if found != set(range(n_before[layer])):
            raise MoePruneError(f"{ckpt.folder}: layer {layer} has experts {sorted(found)} for {pattern!r} on disk, "
                                f"expected 0..{n_before[layer] - 1}")
    missing = set(n_before) - {layer for layer, _ in seen} - sliced_layers
    if missing:
        raise MoePruneError(f"{ckpt.folder}: found no expert tensors of MoE layer(s) {sorted(missing)} in the "
                            "checkpoint; its tensor names do not match the model's conversion mapping")
    return out


def _split(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_tensors(folder: Path, tensors: list[OutTensor], *, max_bytes: int, metadata: dict) -> int:
    shards = _split(tensors, max_bytes)
    if len(shards) == 1:
        write_shard(folder / SINGLE_FILE, shards[0], metadata=metadata)
        return 1
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(folder / name, shard, metadata=metadata)
        weight_map.update({t.name: name for t in shard})
    params = sum(math.prod(t.shape) for t in tensors)
    index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _write_config(src: Path, folder: Path, names: CheckpointNames, n_after: int, updates: dict | None = None) -> None:
    from moeprune.checkpoint.model_dir import load_config
    from moeprune.models.keep import set_expert_count

    config = load_config(src)
    set_expert_count(config, names.adapter.spec, n_after)
    for key, value in (updates or {}).items():  # e.g. the gate-scale flag recovery chose
        setattr(config, key, value)
    config.save_pretrained(folder)


def write_rewrite(src: Path, folder: Path, names: CheckpointNames, kept: Mapping[int, Sequence[int]], *,
                  replacements=None, max_shard_size: int | str = "5GB", provenance: dict | None = None,
                  config_updates: dict | None = None) -> RewriteResult:
    """Write the compressed checkpoint of `src` into the existing (temporary) `folder`: weights shard by
    shard, config with the new expert count (and `config_updates`), tokenizer and generation files,
    `moeprune.json`."""
    from moeprune.checkpoint.writer import write_side_files

    start = time.perf_counter()
    ckpt = Checkpoint(src)
    tensors = plan_rewrite(ckpt, names, kept, replacements)
    shards = _write_tensors(folder, tensors, max_bytes=parse_size(max_shard_size),
                            metadata=ckpt.metadata or {"format": "pt"})
    _write_config(src, folder, names, len(next(iter(kept.values()))), config_updates)
    write_side_files(src, folder, provenance)
    return RewriteResult(out_dir=folder, kept=dict(kept), bytes_before=ckpt.total_bytes,
                         bytes_after=sum(t.nbytes for t in tensors), tensors_written=len(tensors), shards=shards,
                         seconds=time.perf_counter() - start)


def prune_checkpoint(model_dir: str | Path, out_dir: str | Path, keep: Mapping[int, Sequence[int]], *,
                     overwrite: bool = False, max_shard_size: int | str = "5GB", provenance: dict | None = None,
                     where: str = "keep") -> RewriteResult:
    """Write MODEL_DIR with only the experts in `keep` ({layer: [expert indices]}) into `out_dir`.

    Memory stays O(largest sliced router tensor), whatever the checkpoint size. Tokenizer files and the
    generation config are copied; `moeprune.json` records the provenance.
    """
    from moeprune.checkpoint.model_dir import meta_model, resolve_model_dir
    from moeprune.checkpoint.writer import OutputFolder, portable_path
    from moeprune.models.keep import validate_keep

    src = resolve_model_dir(model_dir)
    names = CheckpointNames(meta_model(src))
    kept = validate_keep(names.adapter, keep, where=where)
    folder = OutputFolder(out_dir, inputs=(src,), overwrite=overwrite)
    record = {"base_model": portable_path(src), "kept": kept, **(provenance or {})}
    with folder as tmp:
        res = write_rewrite(src, tmp, names, kept, max_shard_size=max_shard_size, provenance=record)
    res.out_dir = folder.path
    return res
