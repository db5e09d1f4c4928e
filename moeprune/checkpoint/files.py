"""What a checkpoint folder holds on disk: its safetensors files, their bytes and their dtype."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from moeprune.errors import MoePruneError

__all__ = ["safetensors_files", "files_bytes", "checkpoint_dtype", "weights_summary", "DTYPE_NAMES"]

# safetensors dtype codes -> torch dtype names
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def safetensors_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def files_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (safetensors) in a model folder, as on disk."""
    return sum(f.stat().st_size for f in safetensors_files(folder))


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            head = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise MoePruneError(f"{path}: not a readable safetensors file ({exc}); re-download or re-save it") from None
    if not isinstance(head, dict):
        raise MoePruneError(f"{path}: not a readable safetensors file (bad header); re-download or re-save it")
    return head


def checkpoint_dtype(folder: str | Path, config=None) -> str:
    """The floating dtype the weights are stored in: the most common one by bytes in the safetensors
    headers, else the config's `dtype` / `torch_dtype`, else float32."""
    counts: Counter[str] = Counter()
    for f in safetensors_files(folder):
        for name, info in _header(f).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            dt = DTYPE_NAMES.get(info.get("dtype"))
            if dt is not None:
                begin, end = info.get("data_offsets", (0, 0))
                counts[dt] += int(end) - int(begin)
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

    from moeprune.stream.safetensors_io import Checkpoint

    ckpt = Checkpoint(folder)
    params = sum(_math.prod(t.shape) for t in ckpt.tensors.values())
    out = {"params": params, "bytes": files_bytes(folder)}
    if names is not None:
        experts = [t for t in ckpt.tensors.values() if names.role(t.name).kind in ("expert", "fused")]
        out["expert_params"] = sum(_math.prod(t.shape) for t in experts)
        out["expert_bytes"] = sum(t.nbytes for t in experts)
    return out
