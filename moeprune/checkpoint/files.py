"""What a checkpoint folder holds on disk: its safetensors files, their bytes and their dtype."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


__all__ = ["safetensors_files", "files_bytes", "checkpoint_dtype", "weights_summary", "DTYPE_NAMES"]

# safetensors dtype codes -> torch dtype names
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def safetensors_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def files_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (safetensors) in a model folder, as on disk."""
    return sum(f.stat().st_size for f in safetensors_files(folder))


def checkpoint_dtype(folder: str | Path, config=None) -> str:
    """The floating dtype the weights are stored in: the most common one by bytes in the safetensors
    headers, else the config's `dtype` / `torch_dtype`, else float32."""
    from moeprune.checks import check_weight_files
    from moeprune.checkpoint.safetensors_io import Checkpoint

    if not safetensors_files(folder):
        check_weight_files(Path(folder))  # the one-line error for pickle-only or empty folders
    counts: Counter[str] = Counter()
    for info in Checkpoint(folder).tensors.values():  # every header read and checked against its file
        dt = DTYPE_NAMES.get(info.dtype)
        if dt is not None:
            counts[dt] += info.nbytes
    if counts:
        return counts.most_common(1)[0][0]
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if config is not None else None
        if value is not None:
            name = str(value).removeprefix("torch.")
            if name in DTYPE_NAMES.values():
                return name
    return "float32"


def weights_summary(folder: str | Path, names=None) -> dict:
    """Parameters and on-disk bytes of a checkpoint folder's weights, with the routed experts' share
    (classified by `names`, a CheckpointNames of the model family, when given)."""
    import math as _math

    from moeprune.checkpoint.safetensors_io import Checkpoint

    ckpt = Checkpoint(folder)
    params = sum(_math.prod(t.shape) for t in ckpt.tensors.values())
    out = {"params": params, "bytes": files_bytes(folder)}
    if names is not None:
        experts = [t for t in ckpt.tensors.values() if names.role(t.name).kind in ("expert", "fused")]
        out["expert_params"] = sum(_math.prod(t.shape) for t in experts)
        out["expert_bytes"] = sum(t.nbytes for t in experts)
    return out
