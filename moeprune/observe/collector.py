"""Collect router/expert statistics in one streaming pass over calibration batches.

Indexed experts (every family except Llama-4) are observed by swapping the experts module's
`forward` for one that computes each expert only on the tokens routed to it, as the model does,
records the statistics from those very outputs (no recomputation), and returns the same gated sum.
Llama-4's dense-prescaled experts are observed with hooks that recompute the routed experts.
Padding tokens (attention_mask == 0) never enter the statistics.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch

from moeprune.errors import MoePruneError
from moeprune.models import MoEAdapter, MoELayer
from moeprune.observe.stats import OPTIONAL_STATS, LayerStats

__all__ = ["Collector"]


class _LayerObserver:
    """Accumulates one layer's statistics from (token inputs, expert outputs, gates)."""

    def __init__(self, adapter: MoEAdapter, layer: MoELayer, collect: frozenset[str], all_means_tokens: int | None):
        self.adapter, self.layer, self.collect = adapter, layer, collect
        self.all_means_tokens = all_means_tokens
        groups = set(collect) | ({"router_prob"} if adapter.spec.gate is not None else set())
        # allocated on the host; moved once to the compute device by the first call (`_on`)
        self.stats = LayerStats(num_experts=layer.num_experts, hidden_size=adapter.config.hidden_size, groups=groups)

    def _on(self, device: torch.device) -> LayerStats:
        if self.stats.count.device != device:
            self.stats = self.stats.to(device)
        return self.stats

    def add(self, hidden: torch.Tensor, token: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
            outputs: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """One call of the layer: hidden (T, H) its input, and per routed (token, expert) pair the token
        index, expert, gate and expert output; token_mask (T,) marks non-padding tokens (None: all)."""
        logits = self.adapter.router_logits(self.layer, hidden)  # once, for the probabilities and the gram
        p = self.adapter.router_probabilities(logits)
        probs = None if p is None else p[token, expert_ids]
        self.add_pairs(expert_ids, gates, outputs, None if token_mask is None else token_mask[token], probs)
        self.add_tokens(hidden, token_mask, logits)

    # ---------------------------------------------------------------- per-pair statistics
    def add_pairs(self, expert_ids: torch.Tensor, gates: torch.Tensor, outputs: torch.Tensor,
                  valid: torch.Tensor | None, probs: torch.Tensor | None = None) -> None:
        """expert_ids (S,), gates (S,), outputs (S, H) = f_j(x) before gating, valid (S,) bool,
        probs (S,) the router's probability of each pair's expert (None: not available)."""
        if valid is not None:
            expert_ids, gates, outputs = expert_ids[valid], gates[valid], outputs[valid]
            probs = None if probs is None else probs[valid]
        if expert_ids.numel() == 0:
            return
        s = self._on(outputs.device)
        e, f64 = s.num_experts, torch.float64
        ids = expert_ids.to(outputs.device)
        outputs = outputs.detach()
        g = gates.detach().to(f64)
        norms = torch.linalg.vector_norm(outputs, dim=-1, dtype=torch.float32).to(f64)  # (S,)
        s.count += torch.bincount(ids, minlength=e).to(f64)
        s.gate_sum.index_add_(0, ids, g)
        s.norm_sum.index_add_(0, ids, norms)
        s.reap_sum.index_add_(0, ids, g * norms)
        if s.reap_prob_sum is not None and probs is not None:
            s.reap_prob_sum.index_add_(0, ids, probs.detach().to(f64) * norms)
        # abs().amax: several times faster on CPU than vector_norm(ord=inf)
        s.max_abs.scatter_reduce_(0, ids, outputs.abs().amax(dim=-1).to(f64), reduce="amax")
        if s.out_sum is not None:
            s.out_sum.index_add_(0, ids, outputs.to(f64))

    def add_tokens(self, hidden: torch.Tensor, valid: torch.Tensor | None, logits: torch.Tensor) -> None:
        """Token-level statistics that do not depend on routing: router gram and all-token means.
        `logits` (T, E) are the router logits of `hidden`."""
        if not self.collect & {"router_gram", "all_means", "output_cosine"}:
            return
        x = hidden if valid is None else hidden[valid]
        s = self._on(hidden.device)
        if s.logit_gram is not None:
            z = (logits if valid is None else logits[valid]).to(torch.float64)
            s.logit_gram += z.T @ z
            s.logit_sum += z.sum(0)
            s.data["logit_count"] += z.shape[0]
        if s.all_out_sum is None and s.out_cos_sum is None:
            return
        if self.all_means_tokens is not None and x.shape[0] > self.all_means_tokens:
            step = x.shape[0] / self.all_means_tokens
            x = x[(torch.arange(self.all_means_tokens, device=x.device) * step).long()]
        outs = [self.adapter.expert_forward(self.layer, j, x) for j in range(s.num_experts)]  # E x (T, H)
        if s.all_out_sum is not None:
            for j, f in enumerate(outs):
                s.all_out_sum[j] += f.sum(0, dtype=torch.float64)
            s.data["all_count"] += x.shape[0]
        if s.out_cos_sum is not None:
            u = torch.nn.functional.normalize(torch.stack(outs).to(torch.float64), dim=-1)  # (E, T, H)
            s.out_cos_sum += torch.einsum("ith,jth->ij", u, u)
            s.data["out_cos_count"] += x.shape[0]


_FUSED_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
# A fused kernel is always observed through that kernel: a matrix product's rows are not guaranteed to
# come out bit-identical when the rows around them change (on some CPUs they do not), so only running the
# model's own kernel on the same rows in the same order reproduces its output exactly.


def _fused_implementation(experts) -> bool:
    """True when the experts module dispatches to one of transformers' fused kernels (grouped_mm,
    batched_mm): the observed forward then runs that very kernel once over all (token, expert) pairs."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    # `has_bias` is set on every instance by transformers' `use_experts_implementation` decorator (5.16 on),
    # the one that routes `forward` to the fused kernels
    return impl in _FUSED_IMPLEMENTATIONS and hasattr(experts, "has_bias")


def _observed_experts_forward(observer: _LayerObserver, collector: "Collector", fused: bool):
    adapter, layer = observer.adapter, observer.layer

    def forward_fused(self, hidden_states, top_k_index, top_k_weights):
        # The model's own kernel on one row per (token, expert) pair with unit weights gives every pair's
        # output f_e(x) before gating; the kernel sorts the same expert ids the same way as in the plain
        # forward, so each pair's output is bit-identical to the one the plain forward computes, and the
        # gated sum below is the plain forward's own final step.
        t, k = top_k_index.shape
        flat_e = top_k_index.reshape(-1, 1)
        ones = top_k_weights.new_ones(flat_e.shape)
        out_pairs = type(self).forward(self, hidden_states.repeat_interleave(k, dim=0), flat_e, ones)
        final = (out_pairs.view(t, k, -1) * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
        with torch.no_grad():
            token = torch.arange(t * k, device=hidden_states.device) // k
            observer.add(hidden_states, token, flat_e.reshape(-1), top_k_weights.reshape(-1), out_pairs,
                         collector.token_mask)
        return final

    def forward_loop(self, hidden_states, top_k_index, top_k_weights):
        # Pairs grouped by expert and, within an expert, ordered by (top-k slot, token): the rows of each
        # expert's matrix product in the order transformers' eager per-expert loop gives them, so that
        # each pair's output is the one the plain forward computes.
        t, k = top_k_index.shape
        flat_e = top_k_index.t().reshape(-1)  # slot-major: pair p is token p % t, slot p // t
        flat_w = top_k_weights.t().reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        token = order % t  # (S,) token of each (token, expert) pair, grouped by expert
        counts = torch.bincount(flat_e, minlength=layer.num_experts).tolist()
        out_pairs = hidden_states.new_empty(order.shape[0], hidden_states.shape[-1])
        start = 0
        for j, c in enumerate(counts):
            if c:
                out_pairs[start:start + c] = adapter.expert_forward(layer, j, hidden_states[token[start:start + c]])
                start += c
        gates = flat_w[order]
        final = torch.zeros_like(hidden_states)
        final.index_add_(0, token, (out_pairs * gates.unsqueeze(-1)).to(final.dtype))
        with torch.no_grad():
            observer.add(hidden_states, token, flat_e[order], gates, out_pairs, collector.token_mask)
        return final

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return (forward_fused if fused else forward_loop)(self, hidden_states, top_k_index, top_k_weights)

    return forward


class Collector:
    """Attach to a model, run calibration batches, read the statistics.

    Args:
        model: a causal LM of a supported architecture (left unchanged after `detach`).
        collect: optional statistics on top of the core ones: "routed_means", "all_means", "router_gram",
            "output_cosine".
        all_means_tokens: cap on tokens per batch for "all_means" and "output_cosine" (None = every token).
    """

    def __init__(self, model, *, collect: Iterable[str] = (), all_means_tokens: int | None = None):
        collect = frozenset(collect)
        unknown = collect - set(OPTIONAL_STATS)
        if unknown:
            raise MoePruneError(f"unknown statistic(s) {sorted(unknown)}; available: {', '.join(OPTIONAL_STATS)}")
        self.adapter = MoEAdapter(model)
        self.collect = collect
        self.observers = {layer.index: _LayerObserver(self.adapter, layer, collect, all_means_tokens)
                          for layer in self.adapter.layers}
        self.token_mask: torch.Tensor | None = None  # set per batch by `set_mask`
        self._handles: list = []
        self._patched: list = []

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The next batch's attention mask (padding tokens stay out of the statistics). A mask without
        padding is dropped, which spares a masked copy of every pair's output."""
        flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self.token_mask = None if flat is None or bool(flat.all()) else flat

    # ---------------------------------------------------------------- lifecycle
    def attach(self) -> "Collector":
        for layer in self.adapter.layers:
            observer = self.observers[layer.index]
            if self.adapter.spec.experts_call == "indexed":
                fn = _observed_experts_forward(observer, self, _fused_implementation(layer.experts))
                layer.experts.forward = types.MethodType(fn, layer.experts)
                self._patched.append(layer.experts)
            else:
                self._hook_dense(layer, observer)
        return self

    def detach(self) -> None:
        for module in self._patched:
            del module.forward  # back to the class's forward
        for handle in self._handles:
            handle.remove()
        self._patched, self._handles = [], []

    def __enter__(self) -> "Collector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def stats(self) -> dict[int, LayerStats]:
        """The finished statistics, on the host (the only copy from the compute device)."""
        return {i: obs.stats.to("cpu") for i, obs in self.observers.items()}

    # ---------------------------------------------------------------- dense-prescaled experts
    def _hook_dense(self, layer: MoELayer, observer: _LayerObserver) -> None:
        state: dict = {}

        def pre(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            state["hidden"] = h.reshape(-1, h.shape[-1])

        def router_hook(_m, _args, out):
            state["scores"] = out[0]

        def post(_m, _args, _out):
            x, scores = state.pop("hidden"), state.pop("scores")
            token, expert = torch.nonzero(scores > 0, as_tuple=True)
            if token.numel() == 0:
                return
            order = torch.argsort(expert, stable=True)
            token, expert = token[order], expert[order]
            outs = torch.cat([self.adapter.expert_forward(layer, int(j), x[token[expert == j]])
                              for j in torch.unique(expert)])
            with torch.no_grad():
                observer.add(x, token, expert, scores[token, expert], outs, self.token_mask)

        self._handles += [layer.block.register_forward_pre_hook(pre, with_kwargs=True),
                          layer.router.register_forward_hook(router_hook),
                          layer.block.register_forward_hook(post)]
