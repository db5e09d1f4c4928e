"""Two executors behind one interface: the whole model in memory, or one decoder layer at a time.

Both answer the same questions for `run_recipe`: observe the calibration set, run a per-layer search,
evaluate the source, write the compressed checkpoint, evaluate the output. Decisions come from the same
method objects and the output is written by the same shard-by-shard rewrite of the source files (merged
tensors substituted), so the two produce the same files; only where the weights live differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["Executor", "MemoryExecutor", "LayerwiseExecutor", "make_executor", "changed_tensors",
           "trained_tensors", "block_tensors_on_disk"]


def changed_tensors(plan, adapter, layer, decision, names) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor for what a method rewrote in one loaded layer (merged experts, merged
    router rows), in the compressed layout (kept experts renumbered 0..n-1)."""
    from moeprune.checkpoint.replacements import to_disk_names

    changed = decision.changed_experts(layer.index)
    router = plan.method.changed_router(plan) and bool(changed)
    if not changed:
        return {}
    spec = adapter.spec
    kept = decision.kept[layer.index]
    idx = torch.tensor(kept, dtype=torch.long)
    prefix = f"{spec.layers}.{layer.index}.{spec.block}"
    mem = {f"{prefix}.{spec.experts}.{t}": getattr(layer.experts, t).detach().index_select(0, idx.to(
        getattr(layer.experts, t).device)) for t in spec.layout.tensors}
    if router:
        for path, dim in spec.router_tensors:
            t = adapter.tensor(layer, path).detach()
            mem[f"{prefix}.{path}"] = t.index_select(dim, idx.to(t.device))
    new_index = {kept.index(j) for j in changed}
    out = {}
    for name, t in to_disk_names(plan.shape.model, mem).items():
        role = names.role(name)
        if role.kind == "expert" and role.expert not in new_index:
            continue  # untouched expert: copied byte for byte from the source
        if role.kind == "router" and not router:
            continue
        out[name] = t
    return out


def block_tensors_on_disk(plan, layers: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Layer -> {path within the MoE block: tensor} of the compressed model -> layer -> {on-disk name: tensor},
    in the checkpoint's names and layout (experts renumbered 0..n-1)."""
    from moeprune.checkpoint.replacements import to_disk_names

    spec = plan.shape.spec
    return {i: to_disk_names(plan.shape.model, {f"{spec.layers}.{i}.{spec.block}.{path}": t
                                                for path, t in tensors.items()})
            for i, tensors in layers.items()}


def trained_tensors(plan, model, trains: str) -> dict[int, dict[str, torch.Tensor]]:
    """Layer -> {on-disk name: tensor} of every tensor logit-KD recovery trained in the compressed `model`
    (trains: "router" or "moe")."""
    from moeprune.recover import trainable_parameters

    layers: dict[int, dict[str, torch.Tensor]] = {}
    for i, path, p in trainable_parameters(model, trains).values():
        layers.setdefault(i, {})[path] = p.detach()
    return block_tensors_on_disk(plan, layers)


class Executor:
    """Common parts: the tokenizer, the calibration set, writing the compressed checkpoint."""

    mode = ""

    def __init__(self, plan, *, progress: bool = True, log=print):
        self.plan, self.progress, self.log = plan, progress, log
        self._tokenizer = None
        self._calib = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from moeprune.io import load_tokenizer

            self._tokenizer = load_tokenizer(self.plan.src)
        return self._tokenizer

    def calibration(self):
        if self._calib is None:
            from moeprune.observe.calibration import load_calibration

            self._calib = load_calibration(self.plan.calibration, self.tokenizer,
                                           batch_size=self.plan.recipe.calibration.batch_size)
            if self._calib.used_default:
                self.log("no calibration data given: using the built-in mixed calibration set (demo corpus "
                         "calib split)")
        return self._calib

    def _all_means_tokens(self):
        sampled = {"all_means", "output_cosine"} & set(self.plan.collect)
        return self.plan.recipe.merge.all_means_tokens if sampled else None

    def _write(self, folder: Path, decision, replacements, provenance: dict, config: dict | None = None):
        from moeprune.stream.rewrite import write_rewrite

        return write_rewrite(self.plan.src, folder, self.plan.names, decision.kept, replacements=replacements,
                             max_shard_size=self.plan.recipe.max_shard_size, provenance=provenance,
                             config_updates=config)

    def _block_recovery(self, decision, obs, replaced, adapter, model, source=None):
        """Surgery and block-level recovery in one pass over the layers (pipeline/recovery.py); returns the
        BlockRecovery, whose chosen trained tensors are added to `replaced`."""
        from moeprune.pipeline.recovery import run_block_recovery

        blocks = run_block_recovery(
            self.plan, decision, obs, self.calibration().batches, model, adapter, device=self.plan.device,
            replaced=replaced, names=source.names if source is not None else self.plan.names, source=source,
            max_ram_bytes=self._hidden_budget() if source is not None else None, progress=self.progress)
        for i, tensors in blocks.trained_replacements().items():
            replaced.add(i, tensors)
        return blocks

    def _evaluate(self, model, tokenizer) -> dict:
        from moeprune.evaluate import evaluate

        ev = self.plan.recipe.eval
        if not self.plan.tasks:
            return {}
        return evaluate(model, tokenizer, self.plan.tasks, limit=ev.limit, batch_size=ev.batch_size,
                        progress=self.progress)

    def close(self) -> None:
        pass


class MemoryExecutor(Executor):
    """The whole model loaded on one device in the compute dtype."""

    mode = "memory"

    def __init__(self, plan, **kw):
        super().__init__(plan, **kw)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from moeprune.io import load_model

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

    def evaluate(self) -> dict:
        return self._evaluate(self.model, self.tokenizer)

    def compress(self, decision, obs, folder: Path, provenance: dict):
        from moeprune.checkpoint.replacements import Replacements
        from moeprune.models import MoEAdapter
        from moeprune.pipeline.recovery import needs_block_pass

        kd = self._router_kd()  # the original model's targets, before any surgery
        adapter, replaced, blocks = MoEAdapter(self.model), Replacements(), None
        try:
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
                for i, tensors in trained_tensors(self.plan, self.model, kd.trains).items():
                    replaced.add(i, tensors)
            config = blocks.config_updates() if blocks is not None else None
            return self._write(folder, decision, replaced, provenance, config)
        finally:
            replaced.close()

    def _surgery(self, adapter, decision, obs, replaced) -> None:
        from moeprune.compress import prune_experts

        for layer in adapter.layers:
            if decision.changed_experts(layer.index):
                self.plan.method.apply_layer(adapter, layer, decision, obs, self.plan)
                replaced.add(layer.index, changed_tensors(self.plan, adapter, layer, decision, self.plan.names))
        prune_experts(self.model, decision.kept, where="decision")  # the compressed model, for evaluation

    def evaluate_output(self, folder: Path) -> dict:
        return self._evaluate(self.model, self.tokenizer)

    def _router_kd(self):
        """Logit KD (router_kd, moe_kd) set up with the original model's targets (None otherwise)."""
        r = self.plan.recipe.recover
        if r is None or not r.logit_kd:
            return None
        from moeprune.recover import RouterKD
        from moeprune.recover.generate import kd_training_batches
        from moeprune.recover.router_kd import split_batches

        seed = self.plan.recipe.seed if r.seed is None else r.seed
        calib = self.calibration()
        train, held = split_batches(calib.batches, tokens=r.tokens)
        train, generated = kd_training_batches(self.model, self.tokenizer, train, r, max_length=calib.spec.max_length,
                                               batch_size=self.plan.recipe.calibration.batch_size, seed=seed,
                                               progress=self.progress)
        kd = RouterKD(steps=r.steps, lr=r.lr, top_k=r.top_k, train=train, held=held, trains=r.trains, seed=seed,
                      generated=generated)
        kd.compute_targets(self.model)
        return kd


class LayerwiseExecutor(Executor):
    """The model never whole in memory: one decoder layer at a time, read from the safetensors files."""

    mode = "layerwise"

    def _hidden_budget(self) -> int:
        return max(self.plan.max_memory // 2, 64 * 2**20)

    def _source(self, src=None):
        from moeprune.pipeline.layerpass import LayerSource

        return LayerSource(src or self.plan.src, dtype=self.plan.dtype, device=self.plan.device)

    def fingerprint(self) -> str:
        source = self._source()
        try:
            return source.fingerprint()
        finally:
            source.close()

    def observe(self):
        from moeprune.stream import observe_layerwise

        return observe_layerwise(self.plan.src, self.calibration(), collect=self.plan.collect,
                                 all_means_tokens=self._all_means_tokens(), device=self.plan.device,
                                 dtype=self.plan.dtype, max_ram_bytes=self._hidden_budget(), progress=self.progress)

    def layer_search(self, choose, *, max_tokens: int, progressive: bool):
        from moeprune.pipeline.layerpass import layerwise_search

        return layerwise_search(self.plan.src, self.calibration(), choose, dtype=self.plan.dtype,
                                device=self.plan.device, max_tokens=max_tokens, progressive=progressive,
                                max_ram_bytes=self._hidden_budget(), progress=self.progress)

    def compress(self, decision, obs, folder: Path, provenance: dict):
        from moeprune.checkpoint.replacements import Replacements

        from moeprune.pipeline.recovery import needs_block_pass

        replaced = Replacements()
        source = None
        try:
            if needs_block_pass(self.plan.recipe.recover):
                source = self._source()
                blocks = self._block_recovery(decision, obs, replaced, source.adapter, source.model, source)
                provenance["recovery"] = blocks.record()
                return self._write(folder, decision, replaced, provenance, blocks.config_updates())
            layers = [i for i in self.plan.shape.layer_indices if decision.changed_experts(i)]
            if layers:
                source = self._source()
                spec = source.adapter.spec
                for i in layers:
                    names = source.layer_names(i, spec.block)
                    source.load(names)
                    layer = source.adapter.layer(i)
                    self.plan.method.apply_layer(source.adapter, layer, decision, obs, self.plan)
                    replaced.add(i, changed_tensors(self.plan, source.adapter, layer, decision, source.names))
                    source.release(names)
            return self._write(folder, decision, replaced, provenance)
        finally:
            replaced.close()
            if source is not None:
                source.close()

    def _evaluate_folder(self, folder: Path) -> dict:
        """Perplexity one decoder layer at a time over all texts; generation on the offloaded model."""
        from moeprune.evaluate import evaluate
        from moeprune.stream.layerwise_eval import LayerwiseBackend

        ev = self.plan.recipe.eval
        if not self.plan.tasks:
            return {}
        backend = LayerwiseBackend(folder, self.tokenizer, dtype=self.plan.dtype, device=self.plan.device,
                                   max_memory=self.plan.max_memory, batch_size=ev.batch_size, progress=self.progress)
        return evaluate(None, self.tokenizer, self.plan.tasks, limit=ev.limit, batch_size=ev.batch_size,
                        progress=self.progress, backend=backend)

    def evaluate(self) -> dict:
        return self._evaluate_folder(self.plan.src)

    def evaluate_output(self, folder: Path) -> dict:
        return self._evaluate_folder(folder)


def make_executor(plan, **kw) -> Executor:
    return {"memory": MemoryExecutor, "layerwise": LayerwiseExecutor}[plan.execution](plan, **kw)
