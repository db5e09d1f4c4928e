"""Recovery that works one MoE block at a time: `router_kd_block`, `moe_kd_block` and the gate-scale choice.

Both executors run `block_pass` (execution/layerpass.py, through execution/base.py `run_block_recovery`) with a `BlockRecovery` as the visitor. For each
MoE layer the visitor receives the block's inputs on the calibration batches (original model), computes
the original block's outputs once, applies the method's surgery to that layer (merge, then slice to the
kept experts), then for every gate-scale candidate measures the compressed block's relative output
error on the held-back tokens and, with `router_kd_block`, trains the router from the same starting
point (`moe_kd_block`: every parameter of the block). At the end the candidate with the least error
summed over layers is chosen (after training when training). Only router tensors (`moe_kd_block`: the
MoE blocks' tensors) and, for the gate scale, one config flag change.
"""

from __future__ import annotations

import torch

from moeprune.errors import MoePruneError

__all__ = ["BlockRecovery", "gate_flag", "gate_candidates", "needs_block_pass", "recovery_batches", "layer_seed"]


def gate_flag(spec, config) -> str | None:
    """The boolean config key that switches renormalisation of the top-k gates, or None when the
    architecture has none (always renormalised, never, or softmax over the chosen logits)."""
    gate = spec.gate
    if gate is None or not isinstance(gate.renormalize, str) or not hasattr(config, gate.renormalize):
        return None
    return gate.renormalize


def gate_candidates(mode: str, spec, config) -> tuple[str | None, list[bool | None], str | None]:
    """(flag key, candidate values to measure, note). A candidate None leaves the config as it is."""
    key = gate_flag(spec, config)
    if mode == "keep":
        return key, [None], None
    if key is None:
        rule = ("renormalises always" if spec.gate is not None and spec.gate.renormalize is True else
                "has no renormalisation switch in its config")
        why = f"{spec.name}'s router {rule}"
        if mode == "auto":
            return None, [None], f"not applicable: {why}; the gates are left as the architecture computes them"
        raise MoePruneError(f"recover.gate_scale: {mode} needs a renormalisation flag in the config, and {why}; "
                            "use gate_scale: keep or auto")
    current = bool(getattr(config, key))
    if mode == "auto":
        return key, [current, not current], None
    return key, [mode == "renormalize"], None


def needs_block_pass(recover) -> bool:
    return recover is not None and (not recover.logit_kd or recover.gate_scale != "keep")


def recovery_batches(recover, batches: list[dict]) -> tuple[list[dict], int, bool]:
    """(batches the block pass runs over, how many of them are training batches, whether any is held back):
    training batches (block training methods only) first, then the held-back ones (or the training ones when
    the calibration set has a single batch)."""
    from moeprune.recover.router_kd import split_batches

    train, held = split_batches(batches, tokens=recover.tokens)
    if not recover.trains_per_block:
        return (held or train), 0, bool(held)
    return train + held, len(train), bool(held)


def layer_seed(seed: int, layer: int) -> int:
    """The mini-batch order seed of one layer (the same whatever order layers are visited in)."""
    return seed * 10007 + layer


class BlockRecovery:
    """The visitor of `block_pass`: surgery and block-level recovery, one MoE layer at a time."""

    def __init__(self, plan, decision, obs, replaced, *, n_train: int, has_held: bool, names):
        r = plan.recipe.recover
        self.plan, self.decision, self.obs, self.replaced, self.names = plan, decision, obs, replaced, names
        self.cfg, self.train = r, r.trains_per_block
        self.seed = plan.recipe.seed if r.seed is None else r.seed
        self.n_train, self.has_held = n_train, has_held
        self.key, self.candidates, self.note = gate_candidates(r.gate_scale, plan.shape.spec, plan.shape.config)
        self.source_flag = None if self.key is None else bool(getattr(plan.shape.config, self.key))
        self.errors: dict = {c: {} for c in self.candidates}  # candidate -> layer -> (before, after)
        self.losses: dict = {c: {} for c in self.candidates}
        self.tensors: dict = {c: {} for c in self.candidates}  # candidate -> layer -> {path: tensor}
        self.tokens = (0, 0)

    def __call__(self, adapter, layer, inputs: list[torch.Tensor]) -> None:
        from moeprune.compress.prune import prune_layer
        from moeprune.checkpoint.replacements import changed_tensors
        from moeprune.recover.block import block_outputs, fit_block, layer_trainable_parameters, relative_error
        from moeprune.recover.block import set_gate_flag

        i, block = layer.index, layer.block
        held = inputs[self.n_train:] or inputs[:self.n_train]
        x_held = torch.cat(held)
        z_held = block_outputs(block, x_held)
        x_train = torch.cat(inputs[:self.n_train]) if self.train else None
        z_train = block_outputs(block, x_train) if self.train else None
        self.tokens = (0 if x_train is None else x_train.shape[0], x_held.shape[0])
        if self.decision.changed_experts(i):
            self.plan.method.apply_layer(adapter, layer, self.decision, self.obs, self.plan)
            if self.replaced is not None:  # None: a loaded model compressed in place, nothing written
                self.replaced.add(i, changed_tensors(self.plan, adapter, layer, self.decision, self.names))
        prune_layer(adapter, layer, self.decision.kept[i])
        params = layer_trainable_parameters(adapter, layer, self.cfg.trains or "router")
        if self.train and not params:
            raise MoePruneError(f"recover: {adapter.spec.name} has no {self.cfg.trains} parameters to train")
        start = {k: p.detach().clone() for k, p in params.items()}
        for c in self.candidates:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(start[k])
            if c is not None:
                set_gate_flag(block, self.key, c)
            before = relative_error(block, x_held, z_held)
            after = None
            if self.train:
                self.losses[c][i], trained = fit_block(
                    block, params, x_train, z_train, steps=self.cfg.steps, lr=self.cfg.lr,
                    batch_tokens=self.cfg.batch_tokens, seed=layer_seed(self.seed, i), layer=i)
                after = relative_error(block, x_held, z_held)
                self.tensors[c][i] = {k: params[k].detach().clone() for k in trained}
            self.errors[c][i] = (before, after)

    # ------------------------------------------------------------------ after the pass
    def _total(self, c) -> float:
        return sum(a if a is not None else b for b, a in self.errors[c].values())

    @property
    def chosen(self):
        return min(self.candidates, key=self._total)  # ties keep the first (the source's setting)

    def config_updates(self) -> dict:
        c = self.chosen
        return {} if c is None else {self.key: c}

    def trained_replacements(self) -> dict[int, dict[str, torch.Tensor]]:
        """Layer -> {on-disk name: trained tensor} of the chosen candidate (empty without training)."""
        from moeprune.checkpoint.replacements import block_tensors_on_disk
        from moeprune.recover.finite import check_trained

        chosen = self.tensors[self.chosen]
        check_trained(((f"layer {i}: {k}", t) for i, ts in chosen.items() for k, t in ts.items()), lr=self.cfg.lr,
                      steps=self.cfg.steps)
        return block_tensors_on_disk(self.plan, chosen)

    def apply_to(self, adapter) -> None:
        """Leave a loaded model as chosen: its config's expert count, trained tensors and the gate
        flag on every MoE block."""
        from moeprune.models.keep import set_expert_count
        from moeprune.recover.block import layer_trainable_parameters, set_gate_flag

        set_expert_count(adapter.config, adapter.spec, len(next(iter(self.decision.kept.values()))))
        c = self.chosen
        if c is not None:
            setattr(adapter.config, self.key, c)
        for layer in adapter.layers:
            if c is not None:
                set_gate_flag(layer.block, self.key, c)
            params = layer_trainable_parameters(adapter, layer, self.cfg.trains or "router")
            with torch.no_grad():
                for path, t in self.tensors[c].get(layer.index, {}).items():
                    params[path].copy_(t)

    def record(self) -> dict:
        """What recovery did, for moeprune.json and report.json."""
        c, r = self.chosen, self.cfg
        rec: dict = {"method": r.method, "eval_tokens": self.tokens[1],
                     "eval_on": "held-back calibration tokens" if self.has_held
                     else "training tokens (no batch to hold back)"}
        layers = {str(i): {"error_before": b, "error_after": a} for i, (b, a) in sorted(self.errors[c].items())}
        befores = [b for b, _ in self.errors[c].values()]
        rec["error_before"] = sum(befores) / len(befores)
        if self.train:
            for i, losses in self.losses[c].items():
                layers[str(i)].update(loss_first=losses[0], loss_last=losses[-1])
            afters = [a for _, a in self.errors[c].values()]
            trained = sorted({p for t in self.tensors[c].values() for p in t})
            rec.update({"steps": r.steps, "lr": r.lr, "batch_tokens": r.batch_tokens, "seed": self.seed,
                        "train_tokens": self.tokens[0], "error_after": sum(afters) / len(afters),
                        "trained": trained,
                        "trained_params": sum(t.numel() for ts in self.tensors[c].values() for t in ts.values())})
        rec["layers"] = layers
        rec["gate_scale"] = self.gate_record()
        return rec

    def gate_record(self) -> dict:
        mode = self.cfg.gate_scale
        if self.key is None:
            out = {"mode": mode, "applicable": False}
            return {**out, "note": self.note} if self.note else out
        out = {"mode": mode, "applicable": True, "key": self.key, "source": self.source_flag,
               "chosen": self.source_flag if self.chosen is None else self.chosen}
        if mode != "keep":
            when = f"after {self.cfg.method}" if self.train else "of the compressed model"
            out["error"] = {str(c).lower(): self._total(c) for c in self.candidates}
            out["criterion"] = f"relative block-output error {when}, summed over MoE layers, on held-back tokens"
        return out
