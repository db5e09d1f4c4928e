"""The method protocol and its registry.

A method answers three questions, at three moments of the pipeline:

- `check(plan)`: is it feasible for this model and target, from the config alone (before any weight)?
- `decide(obs, plan, executor)`: which experts each layer keeps (and, for merges, which experts each
  kept one absorbs); from observations, or from per-layer calibration inputs the executor provides;
- `apply_layer(adapter, layer, decision, obs, plan)`: tensor surgery on one loaded layer before its
  experts are sliced (merges average their clusters here; pruning needs nothing).

Both executors (in-memory and layer-wise) call the same three, so the two produce the same decisions
and the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moeprune.errors import MoePruneError
from moeprune.score.select import Selection

__all__ = ["Method", "Decision", "METHODS", "register", "get_method", "method_names"]


@dataclass
class Decision:
    """What compression does to every MoE layer."""

    selection: Selection
    clusters: dict[int, list[list[int]]] | None = None  # merges: layer -> clusters, cluster[0] kept
    details: dict = field(default_factory=dict)

    @property
    def kept(self) -> dict[int, list[int]]:
        return self.selection.kept

    def changed_experts(self, layer: int) -> list[int]:
        """Kept experts whose weights the method rewrote (merged clusters), by original index."""
        if self.clusters is None:
            return []
        return sorted(c[0] for c in self.clusters.get(layer, []) if len(c) > 1)


class Method:
    """Base of every compression method; subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "prune"  # "prune" | "merge"
    needs: ClassVar[tuple[str, ...]] = ()  # statistics beyond the core set (collector names)
    needs_layer_inputs: ClassVar[bool] = False  # decides from cached per-layer calibration inputs
    needs_observations: ClassVar[bool] = True  # False: decides without a calibration pass
    changes_router: ClassVar[bool] = False  # apply_layer may rewrite router rows
    help: ClassVar[str] = ""

    def check(self, plan) -> None:
        """Raise MoePruneError if the method cannot run on plan.shape / plan.recipe (no weights read)."""

    def decide(self, obs, plan, executor) -> Decision:
        raise NotImplementedError

    def apply_layer(self, adapter, layer, decision: Decision, obs, plan) -> None:
        """Rewrite one loaded layer in place before its experts are sliced (default: nothing)."""

    def changed_router(self, plan) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<method {self.name}>"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str, *, where: str = "method") -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MoePruneError(f"{where}: unknown method {name!r}; available: {', '.join(method_names())}") from None
