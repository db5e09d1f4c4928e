"""Checks on an input model folder and its tensors, each failing with one line that names the file.

- :func:`check_finite`: no NaN/Inf in floating-point tensors (names the first bad one);
- :func:`check_weight_files`: safetensors weights present and readable (damaged, truncated or
  empty files are named); folders holding only pickle weights are refused (never unpickled);
- :func:`check_config_file`: ``config.json`` is UTF-8 JSON and, for a supported MoE
  architecture, states its expert count (transformers would otherwise fill in a class default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text

__all__ = ["check_finite", "check_weight_files", "check_config_file", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_finite(named_tensors: Iterable, where: str) -> None:
    """Raise naming the first floating-point tensor that holds NaN or Inf.

    Args:
        named_tensors: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()`` or a state dict's
            ``items()``; integer and boolean tensors are skipped.
        where: the file or folder the tensors came from, for the message.
    """
    import torch

    for name, tensor in named_tensors:
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = (~finite).sum().item()
            raise MoePruneError(f"{where}: tensor {name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
                                "the input model is damaged: re-download or re-save it")


def check_weight_files(folder: Path) -> list[Path]:
    """The folder's ``*.safetensors`` files, each with a readable header covering the whole file."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MoePruneError(f"{folder} holds only pickle weights ({pickles[0]}); moeprune never unpickles "
                                "files: convert them to safetensors (save_pretrained(..., "
                                "safe_serialization=True)) in an environment you trust")
        raise MoePruneError(f"{folder} has no *.safetensors weight files")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as exc:  # SafetensorError and OSError: damaged, truncated, empty
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoePruneError(f"{shard}: not a readable safetensors file ({reason}); "
                                "the download or copy is damaged: fetch or save it again") from None
    return shards


def check_config_file(folder: Path) -> dict:
    """``folder/config.json`` as a dict; a supported MoE architecture must state its expert count."""
    from moeprune.models.archs import ARCHS

    path = folder / "config.json"
    try:
        raw = json.loads(read_text(path, what="model config"))
    except json.JSONDecodeError as exc:
        raise MoePruneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise MoePruneError(f"{path}: expected a JSON object of config fields")
    spec = ARCHS.get(raw.get("model_type"))
    if spec is not None:
        source = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        if not any(key in source or key in raw for key in spec.num_experts_keys):
            raise MoePruneError(f"{path}: no expert count for {spec.name}; add "
                                f"{' or '.join(repr(k) for k in spec.num_experts_keys)} (the number of routed "
                                "experts per MoE layer)")
    return raw
