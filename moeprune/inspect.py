"""What a model folder holds: architecture, MoE layers, experts, and where the parameters and bytes are.

Works from `config.json` alone (the model is built on the meta device), so it is instant even for
checkpoints far larger than memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.checkpoint.model_dir import meta_model, resolve_model_dir
from moeprune.models import MoEAdapter

__all__ = ["ModelSummary", "inspect_model", "summarize_module"]


@dataclass
class ModelSummary:
    model_type: str
    architecture: str
    num_layers: int
    moe_layers: list[int]
    experts_per_layer: dict[int, int]
    top_k: int
    dtype: str
    params: dict[str, int] = field(default_factory=dict)  # expert / router / shared / other / total
    bytes: dict[str, int] = field(default_factory=dict)
    files_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _classify(adapter: MoEAdapter) -> dict[str, str]:
    """Parameter name -> "expert" | "router" | "shared" (others are "other")."""
    spec = adapter.spec
    kinds: dict[str, str] = {}
    for layer in adapter.layers:
        prefix = f"{spec.layers}.{layer.index}.{spec.block}."
        for name in spec.layout.tensors:
            kinds[f"{prefix}{spec.experts}.{name}"] = "expert"
        for path, _dim in spec.router_tensors:
            kinds[prefix + path] = "router"
        for attr in spec.shared:
            shared = getattr(layer.block, attr, None)
            if shared is not None:
                for name, _ in shared.named_parameters():
                    kinds[f"{prefix}{attr}.{name}"] = "shared"
    return kinds


def summarize_module(model: torch.nn.Module, *, dtype: torch.dtype | None = None) -> ModelSummary:
    """Count parameters and bytes by kind for a built model (real or on the meta device)."""
    adapter = MoEAdapter(model)
    kinds = _classify(adapter)
    params = {"expert": 0, "router": 0, "shared": 0, "other": 0}
    nbytes = dict.fromkeys(params, 0)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in kinds and not isinstance(tensor, torch.nn.Parameter):
            continue  # non-persistent buffers such as rotary tables are not weights
        kind = kinds.get(name, "other")
        params[kind] += tensor.numel()
        nbytes[kind] += tensor.numel() * (dtype or tensor.dtype).itemsize
    params["total"] = sum(params.values())
    nbytes["total"] = sum(nbytes.values())
    config = model.config
    return ModelSummary(
        model_type=config.model_type,
        architecture=adapter.spec.name,
        num_layers=int(getattr(config, "num_hidden_layers", len(adapter.layers))),
        moe_layers=adapter.layer_indices,
        experts_per_layer={layer.index: layer.num_experts for layer in adapter.layers},
        top_k=adapter.top_k,
        dtype=str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
        params=params,
        bytes=nbytes,
    )


def inspect_model(spec: str | Path) -> ModelSummary:
    """Summarise a model folder from its config, without reading its weights."""
    path = resolve_model_dir(spec)
    model = meta_model(path)
    dtype = getattr(model.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    summary = summarize_module(model, dtype=dtype)
    fewest = min(summary.experts_per_layer.values(), default=summary.top_k)
    if summary.top_k > fewest:
        key = MoEAdapter(model).spec.top_k_key
        raise MoePruneError(f"{path / 'config.json'}: {key} = {summary.top_k} but MoE layers have {fewest} experts; "
                            f"a token cannot be routed to more experts than exist: set {key} <= {fewest}")
    summary.files_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return summary
