"""Logit-KD recovery (`router_kd`, `moe_kd`, `recover.generate`) of a model larger than memory.

Frozen weights are never all resident; what trains is.

- **Teacher**: the original model as `offloaded_model` (decoder layers read from its safetensors files on
  every forward) computes the targets and writes `recover.generate`'s text, before any surgery.
- **Student**: the compressed model, written first to a scratch folder inside the run's temporary output
  (pruned, merged, block-recovered as the recipe says; the input model is never touched), then built by
  `streamed_model`: every tensor the trainer trains is loaded and stays resident, together with whatever a
  module owns directly alongside a trained tensor; every maximal submodule whose subtree holds no resident
  tensor (attention, norms, and under router_kd the experts) gets an accelerate hook that reads its
  weights on every forward and frees them right after. Outside the decoder layers the embedding, the final
  norm and the head stay resident.
- **Activation checkpointing** per decoder layer (`checkpointed_layers`): with gradients on, each decoder
  layer runs under `torch.utils.checkpoint` (non-reentrant, without early stop so that the hooks' post-forward
  always runs), so only the layers' inputs are kept for the backward pass and each streamed submodule reads
  its weights again while its layer is recomputed. `RouterKD.fit` then runs unchanged on the student.

The trained tensors go into the output through the same `Replacements` as in memory, and the output folder is
written from the source checkpoint exactly as the in-memory executor writes it (same files, within float
tolerance). The rule "resident = what trains" takes any set of parameters (`resident_names`), so adapters
whose frozen base streams can reuse it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = ["streamed_model", "resident_names", "checkpointed_layers", "teacher_model", "fit_streamed",
           "resident_bytes", "adapter_bases"]

SCRATCH = ".moeprune-student"  # the compressed model before recovery, inside the run's temporary output


def resident_names(model: nn.Module, params: Iterable[nn.Parameter]) -> set[str]:
    """Names of the tensors (parameters and persistent buffers) that stay resident for training `params`:
    each trained parameter, and every tensor a module owns directly alongside a trained parameter."""
    trained = {id(p) for p in params}
    out: set[str] = set()
    for prefix, module in model.named_modules():
        own = [*module._parameters.items(), *((k, b) for k, b in module._buffers.items()
                                              if k not in module._non_persistent_buffers_set)]
        if any(t is not None and id(t) in trained for _, t in own):
            out.update(f"{prefix}.{k}" if prefix else k for k, t in own if t is not None)
    return out


def _stream_plan(module: nn.Module, prefix: str, resident: set[str], apart: frozenset[str] = frozenset()
                 ) -> tuple[list[str], list[tuple[nn.Module, str]]]:
    """(tensor names to load and keep, (module, its name) pairs to stream) under `module` named `prefix`:
    the maximal submodules whose subtree holds no resident tensor stream, unless a module named in `apart` lies
    strictly inside (it streams on its own); the rest is walked down."""
    names = [f"{prefix}.{k}" for k, _ in module.state_dict(keep_vars=True).items()]
    if not names:
        return [], []
    inside = any(a.startswith(prefix + ".") for a in apart)
    if not resident.intersection(names) and not inside:
        return [], [(module, prefix)]
    keep, streamed = [], []
    for child_name, child in module.named_children():
        k, s = _stream_plan(child, f"{prefix}.{child_name}", resident, apart)
        keep += k
        streamed += s
    own = [f"{prefix}.{k}" for k in (*module._parameters, *module._buffers)]
    return [n for n in own if n in names] + keep, streamed  # what a module owns beside resident tensors stays


def streamed_model(model_dir: str | Path, *, dtype: str | torch.dtype, device: torch.device,
                   trains, apart=None) -> tuple[nn.Module, dict]:
    """The causal LM of `model_dir` for training: the parameters `trains(model)` returns (given the model on
    the meta device) resident with their sibling tensors, the embedding, final norm and head resident, every
    other decoder-layer submodule streamed from the safetensors files on every forward. Returns (model in
    eval mode with use_cache off, what is resident and streamed). `apart(model)`: names of modules that must
    stream on their own (not inside a streamed ancestor): those adapters wrap."""
    from moeprune.checkpoint.model_dir import resolve_model_dir
    from moeprune.execution.layers import _outer_names
    from moeprune.execution.layerwise_eval import _head_names
    from moeprune.execution.offload import LazyWeights, _check_complete, _retie, _stream, weightless_model

    src = resolve_model_dir(model_dir)
    model, loader, aliases, spec = weightless_model(src, dtype, device)
    outer = _outer_names(model, spec.layers, loader)
    outer += _head_names(model, outer, loader)
    resident = resident_names(model, trains(model))
    separate = frozenset(apart(model) if apart is not None else ())
    keep, streamed = [], []
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        k, s = _stream_plan(layer, f"{spec.layers}.{i}", resident, separate)
        keep += k
        streamed += s
    loader.materialise(model, outer + [n for n in keep if n in loader.sources], device)
    _retie(model, aliases)
    weights = LazyWeights(loader, aliases)
    for module, name in streamed:
        _stream(module, weights, f"{name}.", device)
    _check_complete(model, src)
    model.config.use_cache = False  # a cache would be filled twice by the recomputation
    info = {"resident_tensors": len(outer) + len(keep), "streamed_modules": len(streamed), "weights": weights}
    return model, info


def adapter_bases(model: nn.Module, weights, device: torch.device):
    """For adapters over a streamed model (recover/adapters.py): a callable that makes every wrapped module read
    its frozen base tensors from the files when it computes W_eff (`LoRAModule.base_source`), in place of the
    accelerate hook that would load them only inside the base's own call (and overwrite W_eff there)."""
    from accelerate.hooks import remove_hook_from_module

    from moeprune.errors import MoePruneError

    def source(lora) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        for w in lora.wrapped:
            base = w.module.base
            if not hasattr(base, "_hf_hook"):
                continue  # resident (it owns a tensor that trains fully): read as it is
            remove_hook_from_module(base)
            prefix = names[id(w.module)]  # the wrapper took the base's place, so its name is the base's
            other = [n for n, t in [*base.named_parameters(), *base.named_buffers()] if n not in w.module.names]
            if other:
                raise MoePruneError(f"recover.adapter: {prefix} streams {other[0]} beside its adapted tensors; "
                                    "run the adapters in memory (execution: memory)")
            w.module.base_source = (lambda name, p=prefix: weights[f"{p}.{name}"].to(device))

    return source


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers that are not on the meta device now."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with set_checkpoint_early_stop(False):  # the recomputation runs whole: streamed weights are freed
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Every decoder layer of `model` recomputed in the backward pass instead of keeping its activations
    (only with gradients on; evaluation under no_grad runs the layers as they are)."""
    from moeprune.models import MoEAdapter

    layers = model.get_submodule(MoEAdapter(model).spec.layers)
    saved = []
    for layer in layers:
        saved.append(vars(layer).get("forward"))  # an accelerate hook's forward, or None (the class's)
        layer.forward = _checkpointed(layer.forward)
    try:
        yield model
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def teacher_model(plan, row=None):
    """The original model streamed from its files for targets and generation; with the plan's memory `row`
    (recover/memory.py), the leading layers it keeps resident leave room for the targets and activations."""
    from moeprune.execution.offload import offloaded_model

    budget = plan.max_memory
    if row is not None:  # offloaded_model gives half of max_memory to weights
        budget = 2 * max(plan.max_memory - row.targets - row.activations, 0)
    return offloaded_model(plan.src, dtype=plan.dtype, device=plan.device, max_memory=budget)


def fit_streamed(executor, kd, decision, replaced, config: dict | None, folder: Path) -> dict:
    """Write the compressed model (before recovery) to a scratch folder inside `folder`, train the tensors
    `kd` trains on it, streamed, add them to `replaced` and return the fit's record."""
    from moeprune.execution.base import trained_tensors
    from moeprune.recover import trainable_parameters
    from moeprune.recover.adapters import adapted_modules, fully_trained_parameters
    from moeprune.recover.finite import check_trained

    plan = executor.plan
    scratch = Path(folder) / SCRATCH
    scratch.mkdir()
    try:
        executor._write(scratch, decision, replaced, {"scratch": "the compressed model before recovery"}, config)
        lora = kd.adapter == "lora"
        trains = ((lambda m: fully_trained_parameters(m, kd.rank)) if lora  # the factors' bases stream
                  else (lambda m: [p for _, _, p in trainable_parameters(m, kd.trains).values()]))
        student, info = streamed_model(scratch, dtype=plan.dtype, device=plan.device, trains=trains,
                                       apart=(lambda m: adapted_modules(m, kd.rank)) if lora else None)
        executor.log(f"{kd.method}: training {info['resident_tensors']} resident tensors; "
                     f"{info['streamed_modules']} modules streamed from the files on every forward")
        with checkpointed_layers(student):
            record = kd.fit(student, progress=executor.progress,
                            adapter_bases=adapter_bases(student, info["weights"], plan.device) if lora else None)
        trained = (_adapted_tensors(plan, student, kd) if lora else trained_tensors(plan, student, kd.trains))
        check_trained(((n, t) for ts in trained.values() for n, t in ts.items()), lr=kd.lr, steps=kd.steps)
        for i, tensors in trained.items():
            replaced.add(i, tensors)
        del student, trained
        gc.collect()
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _adapted_tensors(plan, student, kd) -> dict[int, dict[str, torch.Tensor]]:
    """Layer -> {on-disk name: tensor} after adapter training over streamed bases: the merged W_eff of every
    adapted tensor and every tensor trained fully (resident in the student)."""
    from moeprune.checkpoint.replacements import block_tensors_on_disk
    from moeprune.recover.adapters import fully_trained

    layers = {i: dict(ts) for i, ts in kd.merged.items()}
    for i, params in fully_trained(student, kd.rank).items():
        layers.setdefault(i, {}).update({path: p.detach() for path, p in params.items()})
    kd.merged = None
    return block_tensors_on_disk(plan, layers)
