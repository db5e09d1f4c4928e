"""Combine observation sets of one model computed separately (other machines, other days, other data).

The statistics are sums and maxima (see the `STATS` table), so combining is exact: the result equals
observing the union of the calibration sets in one pass. The model fingerprint and the collected
statistics must agree; each part's calibration provenance is kept in the result's metadata.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

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
