"""The routing rule of a `GateSpec` as one function: logits (T, E) -> gates (T, k), indices (T, k)."""

from __future__ import annotations

import torch

from moeprune.models.spec import GateSpec

__all__ = ["route_logits", "resolve_flag", "group_routing_active"]


def resolve_flag(value: bool | str, config) -> bool:
    """A spec flag is either a literal bool or the name of a boolean config attribute."""
    return bool(getattr(config, value, False)) if isinstance(value, str) else bool(value)


def _score(x: torch.Tensor, fn: str) -> torch.Tensor:
    if fn == "softmax":
        return torch.softmax(x, dim=-1)
    if fn == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown router score function {fn!r}")


def _group_mask(choice: torch.Tensor, gate: GateSpec, config) -> torch.Tensor:
    """(T, E) bool: experts inside the groups each token may use (group-limited routing)."""
    n_group, topk_group = (int(getattr(config, k)) for k in gate.group_keys)
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    if gate.group == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # "top2sum"
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def group_routing_active(gate: GateSpec, config) -> bool:
    if gate.group is None:
        return False
    if gate.group_when is None:
        return True
    key, value = gate.group_when
    return getattr(config, key, None) == value


def router_probabilities(logits: torch.Tensor, *, gate: GateSpec, config) -> torch.Tensor:
    """The router's own score of every expert (T, E): its score function (softmax over all experts, or
    sigmoid) on the logits, before top-k selection, correction biases, renormalisation or scaling."""
    score_fn = getattr(config, gate.score_key, gate.score) if gate.score_key else gate.score
    return _score(logits.float(), score_fn)


def route_logits(logits: torch.Tensor, *, gate: GateSpec, config, top_k: int,
                 correction_bias: torch.Tensor | None = None, keep_mask: torch.Tensor | None = None):
    """Apply the gate rule to float logits (T, E); returns (weights (T, k), indices (T, k)).

    `keep_mask` (E,) sets the logits of dropped experts to -inf before anything else. For every rule
    in the table this equals the routing of the pruned model exactly: a softmax over logits with some
    set to -inf is the softmax over the rest, sigmoid scores are per expert, and choice biases and
    group scores only ever see the kept experts.
    """
    score_fn = getattr(config, gate.score_key, gate.score) if gate.score_key else gate.score
    logits = logits.float()
    neg_inf = torch.finfo(logits.dtype).min
    if keep_mask is not None:
        logits = logits.masked_fill(~keep_mask, float("-inf"))
    if gate.select_on == "logits":
        values, idx = torch.topk(logits, top_k, dim=-1)
        weights = _score(values, score_fn)
    else:
        scores = _score(logits, score_fn)
        choice = scores if correction_bias is None else scores + correction_bias.float().reshape(-1)
        if keep_mask is not None:
            choice = choice.masked_fill(~keep_mask, float("-inf"))
        if group_routing_active(gate, config):
            allowed = _group_mask(choice, gate, config)
            # DeepSeek-V2 zeroes scores outside the chosen groups; the V3 family uses -inf.
            choice = choice.masked_fill(~allowed, 0.0 if gate.group == "max" else float("-inf"))
            if keep_mask is not None:
                choice = choice.masked_fill(~keep_mask, neg_inf)
        idx = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, idx)
    if resolve_flag(gate.renormalize, config):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + gate.renorm_eps)
    if gate.scaling_key:
        weights = weights * float(getattr(config, gate.scaling_key))
    return weights, idx

