"""Combine observation sets of one model computed separately (other machines, other days, other data).

The statistics are sums and maxima (see the `STATS` table), so combining is exact: the result equals
observing the union of the calibration sets in one pass. The model fingerprint and the collected
statistics must agree; each part's calibration provenance is kept in the result's metadata.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from moeprune import __version__
from moeprune.errors import MoePruneError
from moeprune.observe.stats import STATS_VERSION, Observations

__all__ = ["combine_observations"]

# metadata that must be identical across parts (the model and what was collected)
_SAME = ("model_fingerprint", "model_type", "architecture", "moe_layers", "num_experts", "top_k", "collected")


def combine_observations(parts: Sequence[Observations], *, sources: Sequence[str] | None = None) -> Observations:
    """One `Observations` equal to observing every part's calibration data at once.

    Args:
        parts: two or more observation sets of the same model.
        sources: a name per part (its folder), recorded in the provenance.
    """
    if len(parts) < 2:
        raise MoePruneError("give at least two observation folders to combine")
    sources = list(sources) if sources is not None else [f"part {k}" for k in range(len(parts))]
    _refuse_repeats(parts, sources)
    first = parts[0]
    for name, part in zip(sources[1:], parts[1:]):
        for key in _SAME:
            if part.meta.get(key) != first.meta.get(key):
                raise MoePruneError(f"{name} cannot be combined with {sources[0]}: {key} differs "
                                    f"({part.meta.get(key)!r} vs {first.meta.get(key)!r}); combine only "
                                    "observations of the same model collected with the same --collect")
    layers = {i: copy.deepcopy(s) for i, s in first.layers.items()}
    for name, part in zip(sources[1:], parts[1:]):
        for i, s in part.layers.items():
            try:
                layers[i].merge_(s)
            except MoePruneError as exc:
                raise MoePruneError(f"{name} cannot be combined with {sources[0]} (layer {i}): {exc}") from None
    meta = {key: copy.deepcopy(first.meta.get(key)) for key in _SAME}
    meta.update({
        "moeprune_version": __version__,
        "stats_version": STATS_VERSION,
        "model_path": first.meta.get("model_path", ""),
        "num_tokens": sum(p.num_tokens for p in parts),
        "all_means_tokens": first.meta.get("all_means_tokens"),
        "calibration": {"combined": [{"source": str(name), "num_tokens": p.num_tokens,
                                      "calibration": p.meta.get("calibration"),
                                      "moeprune_version": p.meta.get("moeprune_version")}
                                     for name, p in zip(sources, parts)]},
    })
    return Observations(layers=layers, meta=meta)


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _same_content(a: Observations, b: Observations) -> bool:
    if a.num_tokens != b.num_tokens or a.meta.get("calibration") != b.meta.get("calibration"):
        return False
    if set(a.layers) != set(b.layers):
        return False
    for i, s in a.layers.items():
        ta, tb = s.tensors(), b.layers[i].tensors()
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k].to(ta[k].device)) for k in ta):
            return False
    return True


def _refuse_repeats(parts: Sequence[Observations], sources: list[str]) -> None:
    """The same folder twice (also through a symlink or a trailing slash), or two copies of one observation
    set, would count every token twice."""
    for j in range(1, len(parts)):
        for i in range(j):
            if _same_folder(str(sources[i]), str(sources[j])):
                raise MoePruneError(f"{sources[j]} is the same folder as {sources[i]}; combining it with itself "
                                    "would count its tokens twice: give each observation folder once")
            if _same_content(parts[i], parts[j]):
                raise MoePruneError(f"{sources[j]} holds the same observations as {sources[i]} (same calibration "
                                    "and statistics, a copy); combining them would count those tokens twice: give "
                                    "each observation set once")
