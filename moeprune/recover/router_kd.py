"""Router knowledge distillation (arXiv 2603.02217): after pruning or merging, train only the router
weights (and router biases that take part in the gate's forward) so that the compressed model's
next-token distribution matches the original model's on calibration data.

Targets are computed once, with the original model, before any surgery: for every calibration token the
teacher's `top_k` most likely next tokens and their log-probabilities (full softmax). The loss is the
KL divergence from teacher to student over `top_k` + 1 outcomes — each of those tokens, and "any other
token" carrying the rest of each model's probability — averaged over non-padding tokens; with `top_k`
>= the vocabulary it is the exact KL. Router tensors train in float32 master copies, written back to the
model's own dtype after every step, so bfloat16 models recover too. Biases used only to pick experts
(DeepSeek-V3's correction bias, a buffer) get no gradient and are left as they are.

`moe_kd` is the same objective training every weight of the MoE blocks (router, the surviving routed
experts, shared experts): the experts that remain re-learn part of what the dropped ones computed. The
output keeps the stock format (the same tensors, changed values); attention, norms and embeddings stay.

Cost is bounded by the recipe: `steps` optimizer steps of one calibration batch each, over at most
`tokens` calibration tokens whose targets are held in memory ((tokens x top_k) values).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter
from moeprune.recover.finite import check_loss, check_trained
from moeprune.recover.parallel import DataParallel, state_bytes

__all__ = ["RouterKD", "kd_loss", "teacher_targets", "router_parameters", "trainable_parameters", "split_batches", "take_tokens"]


def split_batches(batches: list[dict], *, tokens: int) -> tuple[list[dict], list[dict]]:
    """Training batches (at most `tokens` non-padding tokens, whole batches, at least one) and held-back
    batches (the last eighth of the calibration set, at least one when there are two or more)."""
    n_held = math.ceil(len(batches) / 8) if len(batches) >= 2 else 0
    pool, held = batches[:len(batches) - n_held], batches[len(batches) - n_held:]
    return take_tokens(pool, tokens)[0], held


def take_tokens(batches: list[dict], tokens: int) -> tuple[list[dict], int]:
    """The leading whole batches of `batches` until they hold at least `tokens` non-padding tokens (at least
    one batch), and how many tokens they hold."""
    taken, used = [], 0
    for b in batches:
        if taken and used >= tokens:
            break
        taken.append(b)
        used += int(_mask(b).sum())
    return taken, used


def _mask(batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    m = batch.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()


@torch.no_grad()
def teacher_targets(model, batches: list[dict], *, top_k: int, progress: bool = False,
                    desc: str = "teacher targets") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(indices (B, S, k) long, log-probabilities (B, S, k) float32) of the teacher's top-k next tokens."""
    from tqdm.auto import tqdm

    out = []
    dev = next(model.parameters()).device
    for b in tqdm(batches, desc=desc, unit="batch", disable=not progress or not batches):
        logits = model(**{k: v.to(dev) for k, v in b.items()}).logits  # (B, S, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        vals, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        out.append((idx.cpu(), vals.cpu()))
    return out


def kd_loss(logits: torch.Tensor, idx: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the KL from teacher to student over k + 1 outcomes: the teacher's top-k
    tokens and "any other token" (the rest of the vocabulary, whose teacher mass is 1 - sum of the top-k).
    Exact KL when k covers the vocabulary; zero when the student equals the teacher. (Renormalising over the
    top-k instead would teach the student to give the rest no mass at all, which raised prose perplexity
    by ~18% once the experts trained too.) logits (B, S, V); idx, teacher_logp (B, S, k); mask (B, S) bool."""
    s_all = F.log_softmax(logits.float(), dim=-1)
    s, t = s_all.gather(-1, idx), teacher_logp.float()
    kl = (t.exp() * (t - s)).sum(-1)
    if idx.shape[-1] < logits.shape[-1]:  # the rest of the vocabulary as one more outcome
        s_rest = torch.logsumexp(s_all.scatter(-1, idx, float("-inf")), dim=-1)  # log of the student's other mass
        t_rest = (1 - t.exp().sum(-1)).clamp(min=0)
        kl = kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def trainable_parameters(model, trains: str) -> dict[str, tuple[int, str, torch.nn.Parameter]]:
    """'layer.path' -> (layer index, path within the MoE block, parameter) of what a recovery method trains
    in every MoE layer: "router" (router tensors that are parameters; buffers such as correction biases are
    left out) or "moe" (every parameter of the block) — recover.block.layer_trainable_parameters per layer."""
    from moeprune.recover.block import layer_trainable_parameters

    adapter = MoEAdapter(model)
    out = {f"{layer.index}.{path}": (layer.index, path, p)
           for layer in adapter.layers for path, p in layer_trainable_parameters(adapter, layer, trains).items()}
    if not out:
        what = "router parameters" if trains == "router" else "MoE-block parameters"
        raise MoePruneError(f"recover: {adapter.spec.name} has no {what} to train")
    return out


def router_parameters(model) -> dict[str, tuple[int, str, torch.nn.Parameter]]:
    """trainable_parameters(model, "router")."""
    return trainable_parameters(model, "router")


@dataclass
class RouterKD:
    """One router-KD run: `targets` come from the original model (computed once, before surgery)."""

    steps: int
    lr: float
    top_k: int
    seed: int
    train: list[dict]
    held: list[dict]
    train_targets: list = None
    held_targets: list = None
    trains: str = "router"  # "router": router tensors only (router_kd); "moe": every MoE-block weight (moe_kd)
    generated: dict | None = None  # what the original model wrote for training (recover.generate), if anything
    parallel: dict | None = None  # after fit: processes and the trainable-state bytes each held (measured)
    adapter: str = "none"  # "lora": moe_kd trains low-rank factors of the MoE-block matrices (recover.adapters)
    rank: int = 16
    alpha: float | None = None  # default 2 x rank
    sharded: bool = False  # torchrun, moe_kd: the MoE blocks' training state sharded by FSDP2 (recover/sharded.py)
    merged: dict | None = None  # adapters over streamed bases: layer -> {block path: W_eff} after fit

    @property
    def method(self) -> str:
        return "router_kd" if self.trains == "router" else "moe_kd"

    def compute_targets(self, model, *, progress: bool = False) -> None:
        self.train_targets = teacher_targets(model, self.train, top_k=self.top_k, progress=progress)
        self.held_targets = teacher_targets(model, self.held, top_k=self.top_k, progress=progress,
                                            desc="teacher targets (held back)")

    def mean_kl(self, model, batches, targets) -> float | None:
        if not batches:
            return None
        dev = next(model.parameters()).device
        total, n = 0.0, 0
        with torch.no_grad():
            for b, (idx, logp) in zip(batches, targets):
                m = _mask(b)
                logits = model(**{k: v.to(dev) for k, v in b.items()}).logits
                total += float(kd_loss(logits, idx.to(dev), logp.to(dev), m.to(dev))) * int(m.sum())
                n += int(m.sum())
        return total / max(n, 1)

    def fit(self, model, *, progress: bool = True, adapter_bases=None) -> dict:
        """Train the router parameters (or every MoE-block parameter, or with `adapter: lora` the routers and
        low-rank factors of the MoE-block matrices, merged back at the end) of the compressed `model` in place;
        returns what was done. `adapter_bases` (layer-wise execution, frozen weights streamed): a callable given
        the attached Adapters that supplies their frozen base tensors; the merged tensors are then left in
        `self.merged` (layer -> {block path: W_eff}) instead of being written into the model."""
        if self.train_targets is None:
            raise MoePruneError("recover: teacher targets were not computed before compression")
        eval_on, eval_t = (self.held, self.held_targets) if self.held else (self.train, self.train_targets)
        before = self.mean_kl(model, eval_on, eval_t)
        lora = None
        if self.adapter == "lora":
            from moeprune.recover.adapters import attach_adapters

            device = None
            if adapter_bases is not None:  # the bases are on meta; the factors go where the model computes
                device = next(p.device for p in model.parameters() if p.device.type != "meta")
            lora = attach_adapters(model, rank=self.rank, alpha=self.alpha, seed=self.seed, device=device)
            if adapter_bases is not None:
                adapter_bases(lora)
            params = lora.trainable_parameters()
        else:
            params = trainable_parameters(model, self.trains)
        try:
            losses = self._train(model, params, progress=progress)
            check_trained(((f"layer {i}: {path}", p) for i, path, p in params.values()), lr=self.lr,
                          steps=self.steps)
            after = self.mean_kl(model, eval_on, eval_t)
        except BaseException:
            if lora is not None:
                lora.detach()
            raise
        extra = {}
        if lora is not None:  # the adapted model's weights, written into the stock tensors
            extra["adapter"] = {"kind": "lora", "rank": lora.rank, "alpha": lora.alpha,
                                "adapted": lora.adapted_paths(), "trained_fully": lora.fully_trained_paths()}
            if adapter_bases is None:
                lora.merge()
            else:
                self.merged = lora.merged_tensors()
                lora.detach()
        return {"method": self.method, "steps": self.steps, "lr": self.lr, "top_k": self.top_k, "seed": self.seed,
                "train_tokens": sum(int(_mask(b).sum()) for b in self.train),
                "eval_tokens": sum(int(_mask(b).sum()) for b in eval_on),
                "eval_on": "held-back calibration tokens" if self.held else "training tokens (no batch to hold back)",
                "kl_before": before, "kl_after": after, "loss_first": losses[0], "loss_last": losses[-1],
                "trained": sorted({path for _, path, _ in params.values()}),
                "trained_params": sum(p.numel() for _, _, p in params.values()),
                "parallel": self.parallel,
                **extra, **({"generated": self.generated} if self.generated is not None else {})}

    def _batches(self, progress: bool):
        """(step, batch, target indices, target log-probabilities, mask) for each of the `steps` steps, in the
        seeded order (every training batch once per pass), under a progress bar (its postfix: `bar`)."""
        from tqdm.auto import tqdm

        gen = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        self.bar = tqdm(range(1, self.steps + 1), desc=f"{self.method} recovery", disable=not progress)
        for step in self.bar:
            if not order:
                order = torch.randperm(len(self.train), generator=gen).tolist()
            i = order.pop(0)
            yield step, self.train[i], *self.train_targets[i], _mask(self.train[i])

    def _log(self, step: int, losses: list[float]) -> None:
        if step % 10 == 0 or step == self.steps:
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}")

    def _train(self, model, params: dict, *, progress: bool) -> list[float]:
        """`steps` Adam steps on `params` ('key' -> (layer, path, parameter)); returns the losses. Model tensors
        train through float32 master copies written back in their dtype; float32 adapter factors
        ('.lora_A' / '.lora_B') train in place (they are their own master)."""
        dp = DataParallel.current()  # torchrun: each step's rows split over the ranks (recover/parallel.py)
        progress = progress and (dp is None or dp.ctx.is_main)  # one bar, rank 0's (the loss is the batch's)
        if self.sharded:
            if dp is None:
                raise MoePruneError("recover.parallel: sharded needs several processes; launch with torchrun")
            return self._train_sharded(model, params, dp, progress=progress)
        factors = {id(p) for _, path, p in params.values() if path.endswith((".lora_A", ".lora_B"))}
        masters = [p if id(p) in factors else p.detach().float().clone().requires_grad_(True)
                   for _, _, p in params.values()]
        opt = dp.optimizer(masters, self.lr) if dp is not None else torch.optim.Adam(masters, lr=self.lr)
        dev = next(model.parameters()).device
        losses = []
        trained = [p for _, _, p in params.values()]
        grads: list = []
        with _frozen_but(model, trained):
            for step, b, idx, logp, mask in self._batches(progress):
                share = dp.local(b, idx, logp, mask) if dp is not None else (b, idx, logp, mask, 1.0)
                loss_value, grads = 0.0, [None] * len(trained)
                if share is not None:
                    with torch.enable_grad():
                        loss = _share_loss(model, dev, share)
                        grads = list(torch.autograd.grad(loss, trained, allow_unused=True))
                    loss_value = float(loss.detach())
                if dp is not None:
                    loss_value = dp.reduce_loss(loss_value)
                    grads = dp.reduce_gradients(grads, trained)
                check_loss(loss_value, step=step, lr=self.lr)
                for m, g in zip(masters, grads):
                    m.grad = None if g is None else g.float()
                opt.step()
                with torch.no_grad():
                    for m, p in zip(masters, trained):
                        if m is not p:
                            p.copy_(m.to(p.dtype))
                losses.append(loss_value)
                self._log(step, losses)
        state = state_bytes(masters, grads, opt)
        self.parallel = dp.record(state) if dp is not None else {"processes": 1, "state_bytes_per_process": [state]}
        return losses

    def _train_sharded(self, model, params: dict, dp, *, progress: bool) -> list[float]:
        """The same steps with the MoE blocks' float32 parameters, gradients and Adam moments sharded over the ranks
        by FSDP2 (recover/sharded.py): every rank runs every step's forward and backward (on its rows, or at weight
        0 when the batch has none for it), the gradients are reduce-scattered as sums, Adam steps the shards."""
        from moeprune.recover.sharded import ShardedBlocks

        dev = next(model.parameters()).device
        losses: list[float] = []
        with _frozen_but(model, []):  # what trains is the blocks' sharded copies, whose own flags say so
            with ShardedBlocks(model, dp.ctx, {id(p) for _, _, p in params.values()}) as blocks:
                opt = torch.optim.Adam(blocks.parameters, lr=self.lr)
                for step, b, idx, logp, mask in self._batches(progress):
                    share = dp.local(b, idx, logp, mask) or dp.idle(b, idx, logp, mask)
                    opt.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss = _share_loss(model, dev, share)
                        loss.backward()
                    loss_value = dp.reduce_loss(float(loss.detach()))
                    check_loss(loss_value, step=step, lr=self.lr)
                    opt.step()
                    losses.append(loss_value)
                    self._log(step, losses)
                state = state_bytes(blocks.parameters, [], opt)
        self.parallel = dp.record(state, sharded=True)
        return losses


@contextlib.contextmanager
def _frozen_but(model, trained):
    """Only `trained` requires grad inside; every model parameter's flag is restored on exit."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        for p in trained:
            p.requires_grad_(True)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))


def _share_loss(model, dev, share) -> torch.Tensor:
    """A rank's (or the one process's) rows of a batch: their KD loss times their weight in the batch."""
    b, idx, logp, mask, weight = share
    logits = model(**{k: v.to(dev) for k, v in b.items()}).logits
    return kd_loss(logits, idx.to(dev), logp.to(dev), mask.to(dev)) * weight
