"""What the two executors share: the tokenizer, the calibration set, block recovery over the layer pass,
evaluation, and writing the compressed checkpoint through the one shard-by-shard rewrite (checkpoint/)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeprune import distributed
from moeprune.checkpoint.replacements import block_tensors_on_disk, changed_tensors

if TYPE_CHECKING:
    from moeprune.recover.blockwise import BlockRecovery

__all__ = ["Executor", "trained_tensors", "run_block_recovery", "changed_tensors"]


def trained_tensors(plan, model, trains: str) -> dict[int, dict[str, torch.Tensor]]:
    """Layer -> {on-disk name: tensor} of every tensor logit-KD recovery trained in the compressed `model`
    (trains: "router" or "moe")."""
    from moeprune.recover import trainable_parameters

    layers: dict[int, dict[str, torch.Tensor]] = {}
    for i, path, p in trainable_parameters(model, trains).values():
        layers.setdefault(i, {})[path] = p.detach()
    return block_tensors_on_disk(plan, layers)


def run_block_recovery(plan, decision, obs, batches: list[dict], model, adapter, *, device, replaced=None,
                       names=None, source=None, max_ram_bytes: int | None = None,
                       progress: bool = True) -> BlockRecovery:
    """Surgery and block-level recovery in one `block_pass` over `model` (loaded, or `source`'s weightless
    one loaded layer by layer); returns the BlockRecovery, which holds the choice and the trained tensors."""
    from moeprune.execution.layerpass import block_pass
    from moeprune.models.keep import validate_keep
    from moeprune.recover.blockwise import BlockRecovery, recovery_batches

    validate_keep(adapter, decision.kept, where="decision")
    batches, n_train, has_held = recovery_batches(plan.recipe.recover, batches)
    blocks = BlockRecovery(plan, decision, obs, replaced, n_train=n_train, has_held=has_held, names=names)
    block_pass(model, batches, blocks, device=device, source=source, max_ram_bytes=max_ram_bytes,
               progress=progress)
    return blocks


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
            from moeprune.checkpoint.model_dir import load_tokenizer

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
        from moeprune.checkpoint.rewrite import write_rewrite

        return write_rewrite(self.plan.src, folder, self.plan.names, decision.kept, replacements=replacements,
                             max_shard_size=self.plan.recipe.max_shard_size, provenance=provenance,
                             config_updates=config)

    def _block_recovery(self, decision, obs, replaced, adapter, model, source=None):
        """Surgery and block-level recovery in one pass over the layers (recover/blockwise.py); returns the
        BlockRecovery, whose chosen trained tensors are added to `replaced`."""
        blocks = run_block_recovery(
            self.plan, decision, obs, self.calibration().batches, model, adapter, device=self.plan.device,
            replaced=replaced, names=source.names if source is not None else self.plan.names, source=source,
            max_ram_bytes=self._hidden_budget() if source is not None else None, progress=self.progress)
        for i, tensors in blocks.trained_replacements().items():
            replaced.add(i, tensors)
        return blocks

    def generation_engine(self, seed: int):
        """A context giving recover.generate's sampler: a vLLM engine on the source folder (shut down on exit)
        when the plan resolved `recover.generate.engine` to vllm, else None (the loaded model samples)."""
        from contextlib import nullcontext

        if self.plan.generate_engine != "vllm":
            return nullcontext(None)
        from moeprune.evaluate.vllm_backend import VLLMBackend, beside_loaded_model

        return VLLMBackend(self.plan.src, self.tokenizer, dtype=self.plan.dtype, seed=seed, progress=self.progress,
                           **beside_loaded_model())

    def _logit_kd_on(self, teacher):
        """Logit KD (router_kd, moe_kd) set up with the targets of `teacher`, the original model (loaded, or
        streamed from its files), on the training batches (with recover.generate's text written by it)."""
        from moeprune.recover import RouterKD
        from moeprune.recover.generate import kd_training_batches
        from moeprune.recover.router_kd import split_batches

        r = self.plan.recipe.recover
        seed = self.plan.recipe.seed if r.seed is None else r.seed
        calib = self.calibration()
        train, held = split_batches(calib.batches, tokens=r.tokens)
        with self.generation_engine(seed) as engine:
            train, generated = kd_training_batches(teacher, self.tokenizer, train, r,
                                                   max_length=calib.spec.max_length, engine=engine,
                                                   batch_size=self.plan.recipe.calibration.batch_size, seed=seed,
                                                   progress=self.progress)
        train = distributed.broadcast_batches(train)  # torchrun: every rank trains on rank 0's text
        kd = RouterKD(steps=r.steps, lr=r.lr, top_k=r.top_k, train=train, held=held, trains=r.trains, seed=seed,
                      generated=generated, adapter=r.adapter, rank=r.rank, alpha=r.alpha,
                      sharded=self.plan.recover_parallel == "sharded")
        kd.compute_targets(teacher, progress=self.progress)
        return kd

    def _evaluate(self, model, tokenizer) -> dict:
        from moeprune.evaluate import evaluate

        ev = self.plan.recipe.eval
        if not self.plan.tasks:
            return {}
        return evaluate(model, tokenizer, self.plan.tasks, limit=ev.limit, batch_size=ev.batch_size,
                        progress=self.progress)

    def evaluate(self) -> dict:
        """The tasks on the source model."""
        return self._evaluate_on(self.plan.src)

    def evaluate_output(self, folder: Path) -> dict:
        """The tasks on the compressed model written to `folder`."""
        return self._evaluate_on(folder)

    def _evaluate_on(self, folder: Path) -> dict:
        if self.plan.eval_backend == "vllm":
            return self._evaluate_with_engine(folder)
        return self._evaluate_hf(folder)

    def _evaluate_hf(self, folder: Path) -> dict:  # each executor: the model as it holds it
        raise NotImplementedError

    def quantize(self, folder: Path):  # each executor: (QuantResult, Replacements) of the recipe's quantize stage
        raise NotImplementedError

    def evaluate_quantized(self, folder: Path) -> dict:  # each executor: the tasks on the quantized model
        raise NotImplementedError

    def _evaluate_with_engine(self, folder: Path) -> dict:
        """The tasks through vLLM's engine on `folder` (the source or the written output); the engine is shut
        down before this returns, so the next model's engine has the memory."""
        from moeprune.evaluate import evaluate
        from moeprune.evaluate.vllm_backend import VLLMBackend

        ev = self.plan.recipe.eval
        if not self.plan.tasks:
            return {}
        with VLLMBackend(folder, self.tokenizer, dtype=self.plan.dtype, progress=self.progress) as engine:
            return evaluate(None, self.tokenizer, self.plan.tasks, limit=ev.limit, batch_size=ev.batch_size,
                            progress=self.progress, backend=engine)

    def close(self) -> None:
        pass


