"""`observe`: run calibration batches through a model with a `Collector` attached."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from moeprune import __version__, distributed
from moeprune.errors import MoePruneError
from moeprune.observe.collector import Collector
from moeprune.observe.stats import Observations, model_fingerprint

__all__ = ["observe"]


def observe(model, calibration, *, collect: Iterable[str] = (), all_means_tokens: int | None = None,
            progress: bool = True) -> Observations:
    """One streaming pass over `calibration` (a CalibrationSet, or any iterable of batches with
    `input_ids` and optional `attention_mask`), returning the statistics of every MoE layer."""
    batches: list[Mapping[str, torch.Tensor]] = list(getattr(calibration, "batches", calibration))
    if not batches:
        raise MoePruneError("calibration set is empty: give at least one calibration sample")
    ctx = distributed.context()  # under torchrun: this rank observes its share, statistics are all-reduced
    device = next(model.parameters()).device
    collector = Collector(model, collect=collect, all_means_tokens=all_means_tokens)
    num_tokens, start = 0, time.perf_counter()
    was_training = model.training
    model.eval()
    with collector, torch.no_grad():
        for batch in tqdm(distributed.shard(batches, ctx), desc="calibration", unit="batch",
                          disable=not progress or not ctx.is_main):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            collector.set_mask(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            num_tokens += int(mask.sum())
        collector.token_mask = None
    model.train(was_training)
    adapter = collector.adapter
    describe = calibration.describe() if hasattr(calibration, "describe") else {"batches": len(batches)}
    meta = {
        "moeprune_version": __version__,
        "model_type": model.config.model_type,
        "architecture": adapter.spec.name,
        "model_fingerprint": model_fingerprint(model),
        "model_path": str(getattr(model, "name_or_path", "") or ""),
        "moe_layers": adapter.layer_indices,
        "num_experts": {str(layer.index): layer.num_experts for layer in adapter.layers},
        "top_k": adapter.top_k,
        "num_tokens": num_tokens,
        "collected": sorted(collector.collect),
        "all_means_tokens": all_means_tokens,
        "calibration": describe,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return distributed.reduce_observations(Observations(layers=collector.stats(), meta=meta), ctx)
