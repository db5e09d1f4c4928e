"""The in-memory executor: the whole model loaded on one device (or placed across GPUs) in its compute dtype;
and `compress_model`, the same surgery on a model a study already holds in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.models import MoEAdapter

from moeprune.execution.base import Executor, changed_tensors, trained_tensors

__all__ = ["MemoryExecutor", "compress_model"]


class MemoryExecutor(Executor):
    """The whole model loaded on one device in the compute dtype."""

    mode = "memory"

    def __init__(self, plan, **kw):
        super().__init__(plan, **kw)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from moeprune.checkpoint.model_dir import load_model

            if self._several_gpus():
                self._model = self._load_across_gpus()
            else:
                self._model = load_model(self.plan.src, dtype=self.plan.dtype, device=str(self.plan.device))
        return self._model

    def _several_gpus(self) -> bool:
        return (self.plan.recipe.device == "auto" and self.plan.device.type == "cuda"
                and torch.cuda.device_count() > 1)

    def _load_across_gpus(self):
        """accelerate's placement over every visible GPU (pipeline placement: one GPU works at a time)."""
        from transformers import AutoModelForCausalLM

        self.log(f"placing the model across {torch.cuda.device_count()} GPUs (device_map=auto)")
        model = AutoModelForCausalLM.from_pretrained(self.plan.src, dtype=getattr(torch, self.plan.dtype),
                                                     device_map="auto", local_files_only=True)
        return model.eval()

    def fingerprint(self) -> str:
        from moeprune.observe import model_fingerprint

        return model_fingerprint(self.model)

    def observe(self):
        from moeprune.observe import observe

        return observe(self.model, self.calibration(), collect=self.plan.collect,
                       all_means_tokens=self._all_means_tokens(), progress=self.progress)

    def layer_search(self, choose, *, max_tokens: int, progressive: bool):
        from moeprune.score.reconstruct import search_layers

        return search_layers(self.model, self.calibration(), choose, max_tokens=max_tokens, progressive=progressive,
                             progress=self.progress)

    def _evaluate_hf(self, folder: Path) -> dict:
        """The loaded model (the source before compression, the compressed model after: pruned in place)."""
        return self._evaluate(self.model, self.tokenizer)

    def compress(self, decision, obs, folder: Path, provenance: dict):
        from moeprune.checkpoint.replacements import Replacements

        replaced = Replacements()
        try:
            config = self._compressed(decision, obs, replaced, provenance)
            return self._write(folder, decision, replaced, provenance, config)
        finally:
            replaced.close()

    def recover_share(self, decision, obs) -> None:
        """torchrun, ranks other than 0: the same surgery and logit-KD recovery as rank 0, training this rank's
        rows of every step (recover/parallel.py); nothing is written."""
        from moeprune.checkpoint.replacements import Replacements

        replaced = Replacements()
        try:
            self._compressed(decision, obs, replaced, {})
        finally:
            replaced.close()

    def _compressed(self, decision, obs, replaced, provenance: dict):
        """Surgery and recovery of the loaded model in place; what changed goes into `replaced`, the recovery
        record into `provenance`; returns the config updates of block recovery (or None)."""
        from moeprune.recover.blockwise import needs_block_pass
        from moeprune.recover.finite import check_trained

        kd = self._router_kd()  # the original model's targets, before any surgery
        adapter, blocks = MoEAdapter(self.model), None
        if needs_block_pass(self.plan.recipe.recover):
            blocks = self._block_recovery(decision, obs, replaced, adapter, self.model)
            blocks.apply_to(adapter)
            provenance["recovery"] = blocks.record()
        else:
            self._surgery(adapter, decision, obs, replaced)
        if kd is not None:
            provenance["recovery"] = kd.fit(self.model, progress=self.progress)
            if blocks is not None:
                provenance["recovery"]["gate_scale"] = blocks.gate_record()
            trained = trained_tensors(self.plan, self.model, kd.trains)
            check_trained(((n, t) for ts in trained.values() for n, t in ts.items()), lr=kd.lr, steps=kd.steps)
            for i, tensors in trained.items():
                replaced.add(i, tensors)
        return blocks.config_updates() if blocks is not None else None

    def quantize(self, folder: Path):
        """The recipe's uniform quantization over the compressed model in memory (in the source dtype): the
        QuantResult and the quantized tensors under their on-disk names."""
        from moeprune.execution.quantize_pass import quantize_layers
        from moeprune.models import MoEAdapter

        if self.plan.dtype != self.plan.source_dtype:  # the output keeps the source dtype (quantized tensors aside)
            self.model.to(getattr(torch, self.plan.source_dtype))
        calibration = self.calibration() if self.plan.recipe.quantize.method == "gptq" else None
        return quantize_layers(self.plan, self.model, MoEAdapter(self.model), calibration=calibration)

    def evaluate_quantized(self, folder: Path) -> dict:
        """The tasks on the quantized model in memory (its weights are the checkpoint's dequantized values)."""
        return self._evaluate(self.model, self.tokenizer)

    def _surgery(self, adapter, decision, obs, replaced) -> None:
        from moeprune.compress import prune_experts

        for layer in adapter.layers:
            if decision.changed_experts(layer.index):
                self.plan.method.apply_layer(adapter, layer, decision, obs, self.plan)
                replaced.add(layer.index, changed_tensors(self.plan, adapter, layer, decision, self.plan.names))
        prune_experts(self.model, decision.kept, where="decision")  # the compressed model, for evaluation

    def _router_kd(self):
        """Logit KD (router_kd, moe_kd) set up with the original model's targets (None otherwise)."""
        r = self.plan.recipe.recover
        if r is None or not r.logit_kd:
            return None
        return self._logit_kd_on(self.model)


@dataclass
class _LoadedPlan:
    recipe: object
    shape: MoEAdapter
    method: object
    n_keep: int | None


class _LoadedModel:
    """The executor interface the methods need, over a loaded model."""

    def __init__(self, model, calibration, progress: bool):
        self.model, self.calib, self.progress = model, calibration, progress

    def layer_search(self, choose, *, max_tokens: int, progressive: bool):
        from moeprune.score.reconstruct import search_layers

        return search_layers(self.model, self.calib, choose, max_tokens=max_tokens, progressive=progressive,
                             progress=self.progress)


def compress_model(model, obs, recipe, *, calibration=None, progress: bool = False):
    """Decide with `recipe.method` and rewrite `model` in place (merge, then slice); returns the Decision.

    With a `recover` section that works block by block (`router_kd_block`, `moe_kd_block`, `method: none`,
    or any `gate_scale` other than keep) the surgery runs inside that pass and `decision.details["recovery"]`
    holds the record, exactly as `run_recipe` computes it in memory. Logit KD (`router_kd`, `moe_kd`) is left
    to the caller (moeprune.recover.RouterKD: its targets come from the model before this call)."""
    from moeprune.compress import prune_experts
    from moeprune.methods import get_method
    from moeprune.recover.blockwise import needs_block_pass
    from moeprune.score import experts_to_keep

    adapter = MoEAdapter(model)
    n_keep = None if recipe.ratio is None and recipe.keep is None else experts_to_keep(
        adapter.num_experts, ratio=recipe.ratio, keep=recipe.keep, top_k=adapter.top_k, where="recipe")
    plan = _LoadedPlan(recipe=recipe, shape=adapter, method=get_method(recipe.method), n_keep=n_keep)
    plan.method.check(plan)
    decision = plan.method.decide(obs, plan, _LoadedModel(model, calibration, progress))
    if needs_block_pass(recipe.recover):
        decision.details["recovery"] = _recover_blocks(model, adapter, plan, decision, obs, calibration, progress)
        return decision
    for layer in adapter.layers:
        if decision.changed_experts(layer.index):
            plan.method.apply_layer(adapter, layer, decision, obs, plan)
    prune_experts(model, decision.kept, where="decision")
    return decision


def _recover_blocks(model, adapter, plan, decision, obs, calibration, progress: bool) -> dict:
    """Surgery and block recovery in one pass over the loaded model (recover/blockwise.py)."""
    from moeprune.errors import MoePruneError
    from moeprune.execution.base import run_block_recovery
    from moeprune.recover.blockwise import gate_candidates

    if calibration is None:
        raise MoePruneError("recover: block recovery needs the calibration batches (calibration=...)")
    gate_candidates(plan.recipe.recover.gate_scale, adapter.spec, adapter.config)  # a forced scale needs the flag
    blocks = run_block_recovery(plan, decision, obs, list(getattr(calibration, "batches", calibration)), model,
                                adapter, device=next(model.parameters()).device, progress=progress)
    blocks.apply_to(adapter)
    return blocks.record()
