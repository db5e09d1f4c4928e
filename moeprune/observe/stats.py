"""Router and expert statistics gathered in one calibration pass, and their safetensors storage.

Per MoE layer and expert j (X_j = non-padding calibration tokens routed to j, g_j the model's real
gate, f_j the expert output before gating):

    count[j]      = |X_j|                                  (frequency)
    gate_sum[j]   = sum_{x in X_j} g_j(x)                  (soft frequency)
    norm_sum[j]   = sum_{x in X_j} ||f_j(x)||_2            (EAN, sum form)
    reap_sum[j]   = sum_{x in X_j} g_j(x) ||f_j(x)||_2     (REAP numerator; REAP = reap_sum / count)
    reap_prob_sum[j] = sum_{x in X_j} p_j(x) ||f_j(x)||_2  (p_j = the router's probability of j before top-k
                                                        renormalisation; REAP as the reference code computes
                                                        it for softmax routers)
    max_abs[j]    = max_{x in X_j} max |f_j(x)|            (super-expert detection)
    out_sum[j]    = sum_{x in X_j} f_j(x)      (H,)        (optional: "routed_means")
    all_out_sum[j]= sum_{x in S} f_j(x)        (H,)        (optional: "all_means", S = sampled tokens)
    logit_gram    = sum_x z(x) z(x)^T          (E, E)      (optional: "router_gram")
    logit_sum     = sum_x z(x)                 (E,)
Memory is O(layers x experts x hidden), never O(tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeprune.errors import MoePruneError

__all__ = ["LayerStats", "Observations", "OPTIONAL_STATS", "STATS_VERSION", "model_fingerprint"]

OPTIONAL_STATS = ("routed_means", "all_means", "router_gram")
_CORE = ("count", "gate_sum", "norm_sum", "reap_sum", "max_abs")
STATS_VERSION = 2  # bump when the collected statistics change (observation caches are keyed on it)


@dataclass
class LayerStats:
    """Accumulators of one MoE layer (float64, on CPU)."""

    num_experts: int
    hidden_size: int
    count: torch.Tensor = None
    gate_sum: torch.Tensor = None
    norm_sum: torch.Tensor = None
    reap_sum: torch.Tensor = None
    max_abs: torch.Tensor = None
    reap_prob_sum: torch.Tensor | None = None  # None in observations saved before it existed
    out_sum: torch.Tensor | None = None
    all_out_sum: torch.Tensor | None = None
    all_count: int = 0
    logit_gram: torch.Tensor | None = None
    logit_sum: torch.Tensor | None = None
    logit_count: int = 0

    def __post_init__(self):
        for name in _CORE:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_experts, dtype=torch.float64))

    @property
    def frequency(self) -> torch.Tensor:
        return self.count

    @property
    def ean_mean(self) -> torch.Tensor:
        return self.norm_sum / self.count.clamp(min=1)

    @property
    def reap(self) -> torch.Tensor:
        return self.reap_sum / self.count.clamp(min=1)

    @property
    def reap_prob(self) -> torch.Tensor:
        if self.reap_prob_sum is None:
            raise MoePruneError("these observations have no router-probability statistic, which reap_prob needs: "
                                "they predate it (re-run `moeprune observe`, or delete the cached observations) "
                                "or the architecture's router has no rule moeprune can re-simulate (PhiMoE: use reap)")
        return self.reap_prob_sum / self.count.clamp(min=1)

    @property
    def routed_mean(self) -> torch.Tensor:
        return self.out_sum / self.count.clamp(min=1).unsqueeze(1)

    @property
    def all_mean(self) -> torch.Tensor:
        return self.all_out_sum / max(self.all_count, 1)

    @property
    def logit_cosine(self) -> torch.Tensor:
        """Cosine similarity of router-logit columns over calibration tokens (E, E)."""
        diag = self.logit_gram.diagonal().clamp(min=1e-30).sqrt()
        return self.logit_gram / (diag[:, None] * diag[None, :])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in _CORE}
        for name in ("reap_prob_sum", "out_sum", "all_out_sum", "logit_gram", "logit_sum"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["all_count"] = torch.tensor([self.all_count], dtype=torch.float64)
        out["logit_count"] = torch.tensor([self.logit_count], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerStats":
        e = t["count"].numel()
        hidden = t["out_sum"].shape[1] if "out_sum" in t else (t["all_out_sum"].shape[1] if "all_out_sum" in t else 0)
        stats = cls(num_experts=e, hidden_size=hidden, **{k: t[k] for k in _CORE})
        for name in ("reap_prob_sum", "out_sum", "all_out_sum", "logit_gram", "logit_sum"):
            setattr(stats, name, t.get(name))
        stats.all_count = int(t["all_count"].item())
        stats.logit_count = int(t["logit_count"].item())
        return stats


def model_fingerprint(model) -> str:
    """A digest that identifies a model: its architecture shape and its router weights."""
    from moeprune.models import MoEAdapter

    adapter = MoEAdapter(model)
    h = hashlib.sha256()
    h.update(json.dumps([model.config.model_type, adapter.layer_indices,
                         [layer.num_experts for layer in adapter.layers]]).encode())
    for layer in adapter.layers:
        w = adapter.tensor(layer, adapter.spec.router_tensors[0][0])
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Observations:
    """Statistics of every MoE layer plus the metadata needed to trust and reuse them."""

    layers: dict[int, LayerStats]
    meta: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{i}.{name}": t.contiguous() for i, s in self.layers.items()
                   for name, t in s.tensors().items()}
        save_file(tensors, folder / "observations.safetensors")
        (folder / "observations.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Observations":
        from safetensors.torch import load_file

        folder = Path(folder)
        st, meta_file = folder / "observations.safetensors", folder / "observations.json"
        if not st.is_file() or not meta_file.is_file():
            raise MoePruneError(f"{folder} holds no observations (expected observations.safetensors and "
                                "observations.json from `moeprune observe`)")
        raw = load_file(st)
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in raw.items():
            _, idx, name = key.split(".", 2)
            grouped.setdefault(int(idx), {})[name] = value
        layers = {i: LayerStats.from_tensors(t) for i, t in sorted(grouped.items())}
        return cls(layers=layers, meta=json.loads(meta_file.read_text()))

    def check_model(self, model, *, where: str = "observations") -> None:
        """Refuse observations that were collected on a different model."""
        want = self.meta.get("model_fingerprint")
        have = model_fingerprint(model)
        if want != have:
            raise MoePruneError(f"{where} were collected on a different model (fingerprint {want}, this model "
                                f"{have}); re-run `moeprune observe` on this model")

    @property
    def num_tokens(self) -> int:
        return int(self.meta.get("num_tokens", 0))
