"""Router and expert statistics gathered in one calibration pass: a schema with reductions.

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
    out_cos_sum[i, j] = sum_{x in S} cos(f_i(x), f_j(x))  (E, E)  (optional: "output_cosine", REAM's
                                                        expert similarity; S = the same sampled tokens)
Memory is O(layers x experts x hidden), never O(tokens).

`STATS` is the one table: each row gives a statistic's shape, how two partial values combine (sum or
max) and the option that collects it. Storage, save/load, validation, `merge_` and `all_reduce_` are
generated from it, so adding a statistic is one row (plus the line of the collector that fills it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeprune.errors import MoePruneError

__all__ = ["Stat", "STATS", "LayerStats", "Observations", "OPTIONAL_STATS", "STATS_VERSION", "model_fingerprint"]

OPTIONAL_STATS = ("routed_means", "all_means", "router_gram", "output_cosine")
STATS_VERSION = 3  # bump when the collected statistics change (observation caches are keyed on it)
# 3: norms in the compute dtype with float32 accumulation, statistics accumulated on the compute device


@dataclass(frozen=True)
class Stat:
    """One statistic. shape: symbols E (experts), H (hidden size) or "1" (a scalar slot);
    reduce: how two partial values combine ("sum" or "max"); group: the option that collects it
    (None: always; "router_prob": architectures whose router probabilities moeprune can re-simulate)."""

    shape: tuple[str, ...]
    reduce: str
    group: str | None = None

    def dims(self, num_experts: int, hidden_size: int) -> tuple[int, ...]:
        return tuple({"E": num_experts, "H": hidden_size, "1": 1}[s] for s in self.shape)


STATS: dict[str, Stat] = {
    "count": Stat(("E",), "sum"),
    "gate_sum": Stat(("E",), "sum"),
    "norm_sum": Stat(("E",), "sum"),
    "reap_sum": Stat(("E",), "sum"),
    "max_abs": Stat(("E",), "max"),
    "reap_prob_sum": Stat(("E",), "sum", group="router_prob"),
    "out_sum": Stat(("E", "H"), "sum", group="routed_means"),
    "all_out_sum": Stat(("E", "H"), "sum", group="all_means"),
    "all_count": Stat(("1",), "sum"),
    "logit_gram": Stat(("E", "E"), "sum", group="router_gram"),
    "logit_sum": Stat(("E",), "sum", group="router_gram"),
    "logit_count": Stat(("1",), "sum"),
    "out_cos_sum": Stat(("E", "E"), "sum", group="output_cosine"),
    "out_cos_count": Stat(("1",), "sum", group="output_cosine"),
}
_REDUCE = {"sum": torch.add, "max": torch.maximum}


class LayerStats:
    """Accumulators of one MoE layer (float64), one tensor per row of `STATS` that is collected.

    Args:
        num_experts, hidden_size: the layer's shape.
        groups: optional groups to allocate on top of the core statistics (see `Stat.group`).
        device: where the accumulators live (the compute device while collecting).
        **tensors: initial values by statistic name (absent or None: zeros if collected).
    """

    def __init__(self, num_experts: int, hidden_size: int, *, groups=(), device=None, **tensors):
        unknown = set(tensors) - set(STATS)
        if unknown:
            raise MoePruneError(f"unknown statistic(s) {sorted(unknown)}; known: {', '.join(STATS)}")
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "hidden_size", hidden_size)
        object.__setattr__(self, "data", {})
        for name, stat in STATS.items():
            if tensors.get(name) is not None:
                self.data[name] = tensors[name]
            elif stat.group is None or stat.group in groups:
                self.data[name] = torch.zeros(stat.dims(num_experts, hidden_size), dtype=torch.float64, device=device)

    def __getattr__(self, name: str):
        if name in STATS:
            return self.__dict__["data"].get(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name not in STATS:
            raise AttributeError(f"LayerStats has no statistic {name!r}; add a row to STATS")
        if value is not None and not torch.is_tensor(value):
            raise TypeError(f"statistic {name} must be a tensor, got {type(value).__name__}")
        if value is None:
            self.data.pop(name, None)
        else:
            self.data[name] = value

    # ---------------------------------------------------------------- derived quantities
    @property
    def all_count(self) -> int:
        return int(self.data["all_count"].sum().item())

    @property
    def logit_count(self) -> int:
        return int(self.data["logit_count"].sum().item())

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

    @property
    def output_similarity(self) -> torch.Tensor:
        """REAM's output similarity: mean over sampled tokens of (cos(f_i(x), f_j(x)) + 1) / 2, in [0, 1] (E, E)."""
        n = max(int(self.out_cos_count.sum().item()), 1)
        return (self.out_cos_sum / n + 1) / 2

    # ---------------------------------------------------------------- generated from the table
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every collected statistic, in table order."""
        return {name: self.data[name] for name in STATS if name in self.data}

    def to(self, device) -> "LayerStats":
        """A copy (or self, when already there) with every accumulator on `device`."""
        if all(t.device == torch.device(device) for t in self.data.values()):
            return self
        return LayerStats(self.num_experts, self.hidden_size, **{k: v.to(device) for k, v in self.data.items()})

    def merge_(self, other: "LayerStats") -> "LayerStats":
        """Combine `other` into self (sums add, maxima max); both must hold the same statistics."""
        if set(self.data) != set(other.data) or self.num_experts != other.num_experts:
            raise MoePruneError(f"cannot merge statistics of different kinds: {sorted(self.data)} "
                                f"({self.num_experts} experts) vs {sorted(other.data)} ({other.num_experts} experts)")
        for name, t in self.data.items():
            self.data[name] = _REDUCE[STATS[name].reduce](t, other.data[name].to(t.device))
        return self

    def all_reduce_(self, group=None, device=None) -> "LayerStats":
        """In place across the ranks of a torch.distributed process group (sum rows summed, max rows maxed).
        `device`: where the collective runs (the CUDA device for nccl), tensors are moved back after."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        for name in STATS:
            if name in self.data:
                t = self.data[name]
                work = t if device is None else t.to(device)
                dist.all_reduce(work, op=ops[STATS[name].reduce], group=group)
                self.data[name] = work if device is None else work.to(t.device)
        return self

    def check(self, *, where: str, num_experts: int | None = None, hidden_size: int | None = None) -> None:
        """Refuse statistics whose shapes disagree with the table (and the model, when given) or that
        are not finite."""
        e = self.num_experts if num_experts is None else num_experts
        h = self.hidden_size if hidden_size is None else hidden_size
        for name, t in self.data.items():
            want = STATS[name].dims(e, h)
            if tuple(t.shape) != want:
                raise MoePruneError(f"{where}: statistic {name} has shape {tuple(t.shape)}, expected {want} "
                                    f"({e} experts, hidden size {h}); re-run `moeprune observe` on this model")
            if not bool(torch.isfinite(t).all()):
                raise MoePruneError(f"{where}: statistic {name} holds NaN or infinite values; the observations are "
                                    "damaged: re-run `moeprune observe`")

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerStats":
        if "count" not in t:
            raise MoePruneError(f"statistics without 'count' (have {sorted(t)})")
        e = t["count"].numel()
        hidden = next((t[n].shape[STATS[n].shape.index("H")] for n in STATS if n in t and "H" in STATS[n].shape
                       and t[n].dim() == len(STATS[n].shape)), 0)
        return cls(num_experts=e, hidden_size=hidden, **{k: v.to(torch.float64) for k, v in t.items()})


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

    def __post_init__(self):
        self.meta.setdefault("stats_version", STATS_VERSION)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{i}.{name}": t.detach().to("cpu", torch.float64).contiguous()
                   for i, s in self.layers.items() for name, t in s.tensors().items()}
        save_file(tensors, folder / "observations.safetensors")
        (folder / "observations.json").write_text(json.dumps(self.meta, indent=2, allow_nan=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Observations":
        """Read a folder written by `save`; damaged or foreign content is one MoePruneError naming the folder."""
        folder = Path(folder)
        st, meta_file = folder / "observations.safetensors", folder / "observations.json"
        if not st.is_file() or not meta_file.is_file():
            raise MoePruneError(f"{folder} holds no observations (expected observations.safetensors and "
                                "observations.json from `moeprune observe`)")
        meta = _read_meta(meta_file)
        grouped = _read_tensors(st)
        try:
            layers = {i: LayerStats.from_tensors(t) for i, t in sorted(grouped.items())}
        except MoePruneError as exc:
            raise MoePruneError(f"observations in {folder} are damaged: {exc}") from None
        obs = cls(layers=layers, meta=meta)
        obs.check(where=f"observations in {folder}")
        return obs

    def check(self, *, where: str = "observations", model=None) -> None:
        """Shapes against the table and the metadata (and the model or its MoEAdapter, when given);
        finite values."""
        experts = self.meta.get("num_experts") or {}
        hidden = None
        if model is not None:
            from moeprune.models import MoEAdapter

            adapter = model if isinstance(model, MoEAdapter) else MoEAdapter(model)
            experts = {str(layer.index): layer.num_experts for layer in adapter.layers}
            hidden = adapter.config.hidden_size
            if sorted(self.layers) != sorted(adapter.layer_indices):
                raise MoePruneError(f"{where} cover MoE layers {sorted(self.layers)}, this model has "
                                    f"{adapter.layer_indices}; re-run `moeprune observe` on this model")
        for i, s in self.layers.items():
            s.check(where=f"{where}, layer {i}", num_experts=experts.get(str(i)), hidden_size=hidden)

    def check_model(self, model, *, where: str = "observations") -> None:
        """Refuse observations that were collected on a different model."""
        want = self.meta.get("model_fingerprint")
        have = model_fingerprint(model)
        if want != have:
            raise MoePruneError(f"{where} were collected on a different model (fingerprint {want}, this model "
                                f"{have}); re-run `moeprune observe` on this model")
        self.check(where=where, model=model)

    def to(self, device) -> "Observations":
        return Observations({i: s.to(device) for i, s in self.layers.items()}, self.meta)

    @property
    def num_tokens(self) -> int:
        return int(self.meta.get("num_tokens", 0))


def _read_meta(meta_file: Path) -> dict:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoePruneError(f"observations in {meta_file.parent} are damaged: {meta_file.name} is not valid JSON "
                            f"({exc}); re-run `moeprune observe`") from None
    if not isinstance(meta, dict):
        raise MoePruneError(f"observations in {meta_file.parent} are damaged: {meta_file.name} is not a JSON object")
    version = meta.setdefault("stats_version", 2)  # folders written before versioning hold version 2
    if not isinstance(version, int) or version > STATS_VERSION:
        raise MoePruneError(f"observations in {meta_file.parent} have statistics version {version!r}; this moeprune "
                            f"reads up to {STATS_VERSION}: upgrade moeprune or re-run `moeprune observe`")
    return meta


def _read_tensors(st: Path) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(st)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoePruneError(f"observations in {st.parent} are damaged: {st.name} cannot be read ({exc}); "
                            "re-run `moeprune observe`") from None
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "layer" or not parts[1].isdigit() or parts[2] not in STATS:
            raise MoePruneError(f"observations in {st.parent} are damaged: unknown tensor {key!r} in {st.name} "
                                f"(expected layer.N.<{'|'.join(STATS)}>); re-run `moeprune observe`")
        grouped.setdefault(int(parts[1]), {})[parts[2]] = value
    if not grouped:
        raise MoePruneError(f"observations in {st.parent} are damaged: {st.name} holds no statistics")
    return grouped
