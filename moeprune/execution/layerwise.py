"""The layer-wise executor: the model is never whole in memory; one decoder layer at a time is read from the
safetensors files (observation, searches, block recovery, perplexity), generation runs on the offloaded model."""

from __future__ import annotations

from pathlib import Path

from moeprune.execution.base import Executor, changed_tensors

__all__ = ["LayerwiseExecutor"]


class LayerwiseExecutor(Executor):
    """The model never whole in memory: one decoder layer at a time, read from the safetensors files."""

    mode = "layerwise"

    def _hidden_budget(self) -> int:
        return max(self.plan.max_memory // 2, 64 * 2**20)

    def _source(self, src=None):
        from moeprune.execution.layerpass import LayerSource

        return LayerSource(src or self.plan.src, dtype=self.plan.dtype, device=self.plan.device)

    def fingerprint(self) -> str:
        source = self._source()
        try:
            return source.fingerprint()
        finally:
            source.close()

    def observe(self):
        from moeprune.execution.layers import observe_layerwise

        return observe_layerwise(self.plan.src, self.calibration(), collect=self.plan.collect,
                                 all_means_tokens=self._all_means_tokens(), device=self.plan.device,
                                 dtype=self.plan.dtype, max_ram_bytes=self._hidden_budget(), progress=self.progress)

    def layer_search(self, choose, *, max_tokens: int, progressive: bool):
        from moeprune.execution.layerpass import layerwise_search

        return layerwise_search(self.plan.src, self.calibration(), choose, dtype=self.plan.dtype,
                                device=self.plan.device, max_tokens=max_tokens, progressive=progressive,
                                max_ram_bytes=self._hidden_budget(), progress=self.progress)

    def compress(self, decision, obs, folder: Path, provenance: dict):
        from moeprune.checkpoint.replacements import Replacements

        replaced = Replacements()
        try:
            kd = self._logit_kd()  # the original model's targets (streamed), before any surgery
            config, blocks = self._compressed(decision, obs, replaced)
            if blocks is not None:
                provenance["recovery"] = blocks.record()
            if kd is not None:
                from moeprune.execution.streamkd import fit_streamed

                provenance["recovery"] = fit_streamed(self, kd, decision, replaced, config, folder)
                if blocks is not None:
                    provenance["recovery"]["gate_scale"] = blocks.gate_record()
            return self._write(folder, decision, replaced, provenance, config)
        finally:
            replaced.close()

    def _compressed(self, decision, obs, replaced):
        """Surgery (and block recovery) one layer at a time into `replaced`; returns (config updates, the
        BlockRecovery or None)."""
        from moeprune.recover.blockwise import needs_block_pass

        source = None
        try:
            if needs_block_pass(self.plan.recipe.recover):
                source = self._source()
                blocks = self._block_recovery(decision, obs, replaced, source.adapter, source.model, source)
                return blocks.config_updates(), blocks
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
            return None, None
        finally:
            if source is not None:
                source.close()

    def quantize(self, folder: Path):
        """The recipe's uniform quantization over the compressed output written to `folder`, one decoder layer
        read at a time (in the source dtype): the QuantResult and the quantized tensors under their on-disk names."""
        from moeprune.execution.layerpass import LayerSource
        from moeprune.execution.quantize_pass import SourceLayers, quantize_layers

        source = LayerSource(folder, dtype=self.plan.source_dtype, device=self.plan.device)
        try:
            calibration = self.calibration() if self.plan.recipe.quantize.method == "gptq" else None
            return quantize_layers(self.plan, source.model, source.adapter, calibration=calibration,
                                   access=SourceLayers(source, self.plan.device))
        finally:
            source.close()

    def evaluate_quantized(self, folder: Path) -> dict:
        """The tasks on `folder`, which holds the quantized values unpacked at this point (one layer at a time)."""
        return self._evaluate_on(folder)

    def _logit_kd(self):
        """Logit KD (router_kd, moe_kd) set up with the targets of the original model, streamed from its files
        (recover/generate.py's text too), or None."""
        r = self.plan.recipe.recover
        if r is None or not r.logit_kd:
            return None
        import gc

        from moeprune.execution.streamkd import teacher_model

        teacher = teacher_model(self.plan, self.plan.recovery_row)
        try:
            return self._logit_kd_on(teacher)
        finally:
            del teacher
            gc.collect()  # the hooked teacher is freed by the cycle collector only

    def _evaluate_hf(self, folder: Path) -> dict:
        """Perplexity one decoder layer at a time over all texts; generation on the offloaded model."""
        from moeprune.evaluate import evaluate
        from moeprune.execution.layerwise_eval import LayerwiseBackend

        ev = self.plan.recipe.eval
        if not self.plan.tasks:
            return {}
        backend = LayerwiseBackend(folder, self.tokenizer, dtype=self.plan.dtype, device=self.plan.device,
                                   max_memory=self.plan.max_memory, batch_size=ev.batch_size, progress=self.progress)
        return evaluate(None, self.tokenizer, self.plan.tasks, limit=ev.limit, batch_size=ev.batch_size,
                        progress=self.progress, backend=backend)
