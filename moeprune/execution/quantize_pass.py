"""A recipe's `quantize` stage (uniform: round to nearest or GPTQ) as one pass over the compressed model's decoder
layers, the same code for both executors.

The in-memory executor runs the pass over its loaded model; the layer-wise executor over the weightless model of
the compressed output it has just written, each decoder layer read from the safetensors files before it is
quantized and freed after (GPTQ: one layer's weights and Hessians at a time, plus the calibration set's hidden
states). Every quantized tensor goes, under its on-disk name, into `Replacements` (spilled to disk); the stage
then writes those values into the output's shards and packs them (compress/quantize.py), so both executors
write the same files.
"""

from __future__ import annotations

import torch

from moeprune.checkpoint.replacements import Replacements, to_disk_names

__all__ = ["quantize_layers", "SourceLayers"]


class SourceLayers:
    """`gptq_quantize_layers`' weight access for a `LayerSource`: each decoder layer read when it is needed."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self._loaded: list[str] = []
        self._outer: list[str] = []

    def load_outer(self) -> None:
        from moeprune.execution.layers import _move_buffers, _outer_names

        model = self.source.model
        self._outer = _outer_names(model, self.source.adapter.spec.layers, self.source.loader)
        self.source.load(self._outer)
        _move_buffers(model, self.device)

    def release_outer(self) -> None:
        self.source.release(self._outer)

    def _params_of(self, modules: list[str]) -> list[str]:
        state = self.source.model.state_dict(keep_vars=True)
        return [k for k in state if k.rsplit(".", 1)[0] in set(modules)]

    def load_modules(self, names: list[str]) -> None:
        self.source.load(self._params_of(names))

    def release_modules(self, names: list[str]) -> None:
        self.source.release(self._params_of(names))

    def load(self, index: int) -> None:
        self._loaded = self.source.layer_names(index)
        self.source.load(self._loaded)

    def release(self, index: int) -> None:
        self.source.release(self._loaded)
        self._loaded = []


def quantize_layers(plan, model, adapter, *, calibration=None, access=None, log=None):
    """Quantize `model` (the compressed model: loaded, or weightless with `access`) as the recipe says; returns
    (QuantResult, Replacements of every quantized tensor under its on-disk name). The caller closes the
    Replacements."""
    from moeprune.compress.gptq import GPTQOptions, gptq_quantize_layers
    from moeprune.compress.quantize import uniform_result
    from moeprune.compress.quantize_plan import quant_targets

    q = plan.recipe.quantize
    targets = [name for name, _ in quant_targets(model, adapter).linears]
    options = GPTQOptions(damp=q.damp, act_order=q.act_order, block_size=q.block_size, min_tokens=q.min_expert_tokens)
    replaced = Replacements()

    def on_quantized(index, tensors):
        replaced.add(-1 if index is None else index, to_disk_names(plan.shape.model, tensors))

    try:
        result = uniform_result(model, adapter, bits=q.bits, group_size=plan.quant_group_size, method=q.method,
                                details=None)
        result.method_details = gptq_quantize_layers(
            model, adapter, None if calibration is None else list(calibration.batches), bits=q.bits,
            group_size=plan.quant_group_size, targets=targets, options=options, method=q.method, access=access,
            on_quantized=on_quantized, log=log)
    except BaseException:
        replaced.close()
        raise
    return result, replaced
