"""Checks on an input model folder and its tensors, each failing with one line that names the file.

- :func:`check_finite`: no NaN/Inf in floating-point tensors (names the first bad one);
- :func:`check_weight_files`: safetensors weights present and readable (damaged, truncated or
  empty files are named); folders holding only pickle weights are refused (never unpickled);
- :func:`check_config_file`: ``config.json`` is UTF-8 JSON and, for a supported MoE
  architecture, states its expert count (transformers would otherwise fill in a class default);
  :func:`check_config_values`: no NaN/Infinity anywhere in it, and sizes, counts, top-k, eps and rope theta
  in sane ranges (``CONFIG_RANGES``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text

__all__ = ["check_finite", "check_weight_files", "check_config_file", "check_config_values", "PICKLE_SUFFIXES",
           "CONFIG_RANGES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# config.json fields the tools read or size the model by: (integer?, lowest, highest, what it is). Bounds are
# far beyond any real model (DeepSeek-V3: hidden 7168, 61 layers, 256 experts, vocabulary 129280) and stop
# typos and damaged files from building absurd models. The expert count and top-k keys of each
# architecture (models/archs.py) are checked too, and top-k against the expert count.
CONFIG_RANGES: dict[str, tuple[bool, float, float, str]] = {
    "hidden_size": (True, 1, 2**20, "the model width"),
    "intermediate_size": (True, 0, 2**22, "the MLP width"),
    "moe_intermediate_size": (True, 0, 2**22, "the expert MLP width"),
    "shared_expert_intermediate_size": (True, 0, 2**22, "the shared-expert MLP width"),
    "num_hidden_layers": (True, 1, 4096, "the number of decoder layers"),
    "num_attention_heads": (True, 1, 65536, "the number of attention heads"),
    "num_key_value_heads": (True, 1, 65536, "the number of key/value heads"),
    "head_dim": (True, 1, 65536, "the width of an attention head"),
    "vocab_size": (True, 1, 2**24, "the vocabulary size"),
    "max_position_embeddings": (True, 1, 2**27, "the context length"),
    "n_shared_experts": (True, 0, 65536, "the number of shared experts"),
    "n_group": (True, 1, 65536, "the number of expert groups"),
    "topk_group": (True, 1, 65536, "the expert groups each token is routed to"),
    "first_k_dense_replace": (True, 0, 4096, "the leading dense layers"),
    "decoder_sparse_step": (True, 1, 4096, "the MoE layer interval"),
    "rms_norm_eps": (False, 0, 1, "the norm epsilon"),
    "layer_norm_eps": (False, 0, 1, "the norm epsilon"),
    "layer_norm_epsilon": (False, 0, 1, "the norm epsilon"),
    "norm_eps": (False, 0, 1, "the norm epsilon"),
    "rope_theta": (False, 0, 1e15, "the rotary base"),
    "routed_scaling_factor": (False, 0, 1e6, "the routed-gate scale"),
}
EXPERTS_RANGE = (1, 65536)
_OPEN_BELOW = {"rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta",
               "routed_scaling_factor"}  # must be > the lowest bound, not equal to it


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
    check_config_values(raw, path, spec=spec)
    return raw


def _non_finite(value, where: str):
    """(dotted field, value) of the first NaN/Infinity in JSON data, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        found = _non_finite(sub, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if found:
            return found
    return None


def _shown(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return json.dumps(v)


def _check_field(path: Path, name: str, v, integer: bool, lo: float, hi: float, what: str, open_below=False):
    if v is None:
        return
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = is_int or (isinstance(v, float) and not integer)
    ok = is_num and (lo < v if open_below else lo <= v) and v <= hi
    if not ok:
        kind = "an integer" if integer else "a number"
        span = f"{'(' if open_below else '['}{lo:g}, {hi:g}]" if not integer else f"[{int(lo)}, {int(hi)}]"
        raise MoePruneError(f"{path}: {name} = {_shown(v)}; {what} must be {kind} in {span}: fix the value "
                            "(the file may be damaged)")


def check_config_values(raw: dict, path: Path, *, spec=None) -> None:
    """No NaN/Infinity anywhere in the config, and the fields of `CONFIG_RANGES` (at the top level, in
    `text_config` and in `rope_parameters` / `rope_scaling`), the architecture's expert count and top-k in range;
    one line naming `path` and the field."""
    bad = _non_finite(raw, "")
    if bad:
        raise MoePruneError(f"{path}: {bad[0]} = {_shown(bad[1])}; config values must be finite numbers: fix the "
                            "value (the file may be damaged)")
    sections = [("", raw)]
    if isinstance(raw.get("text_config"), dict):
        sections.append(("text_config.", raw["text_config"]))
    for prefix, section in list(sections):
        for rope in ("rope_parameters", "rope_scaling"):
            if isinstance(section.get(rope), dict):
                sections.append((f"{prefix}{rope}.", section[rope]))
    for prefix, section in sections:
        for name, (integer, lo, hi, what) in CONFIG_RANGES.items():
            if name in section:
                _check_field(path, prefix + name, section[name], integer, lo, hi, what, name in _OPEN_BELOW)
        if spec is None or "rope" in prefix:
            continue
        experts = None
        for key in spec.num_experts_keys:
            if key in section:
                _check_field(path, prefix + key, section[key], True, *EXPERTS_RANGE, "the routed-expert count")
                experts = section[key] if section[key] is not None else experts
        k, key = section.get(spec.top_k_key), prefix + spec.top_k_key
        if k is not None:
            _check_field(path, key, k, True, 1, EXPERTS_RANGE[1], "top-k (the experts each token is routed to)")
            if isinstance(experts, int) and k > experts:
                raise MoePruneError(f"{path}: {key} = {k} but MoE layers have {experts} experts; a token cannot be "
                                    f"routed to more experts than exist: set {key} <= {experts}")
        heads, kv = section.get("num_attention_heads"), section.get("num_key_value_heads")
        if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
            raise MoePruneError(f"{path}: {prefix}num_key_value_heads = {kv} does not divide "
                                f"num_attention_heads = {heads}; each key/value head serves a whole group of "
                                "attention heads: fix the value")
        groups, kept = section.get("n_group"), section.get("topk_group")
        if isinstance(groups, int) and isinstance(kept, int) and kept > groups:
            raise MoePruneError(f"{path}: {prefix}topk_group = {kept} is more than n_group = {groups}; a token "
                                "cannot use more expert groups than exist: fix the value")
