"""Weight-only quantization of MoE checkpoints that stock transformers reloads from `config.json`.

Two storage formats, chosen by measurement on transformers 5.23 (see docs/quantization.md):

* uniform `bits` in {4, 8}: compressed-tensors "pack-quantized" — symmetric int, group-wise (or
  per-row, "channel") scales along the input dim, packed into int32. Every routed expert (saved in the
  per-expert checkpoint layout) and every other nn.Linear is quantized; routers, shared-expert gates,
  embeddings and lm_head stay in the source dtype (see `quantize_plan` for the targets and group size).
  transformers dequantizes it while loading (the experts scheme is one for all experts, which is why
  widths cannot be mixed in this format).
* mixed precision (`mixed=MixedBudget(...)`): torchao `FqnToConfig`, one config per fused expert
  tensor, so each MoE layer's experts are stored either as float8 (8 bits + a per-row scale) or
  left dense, chosen by `allocate_bits` from the layer importance (see `quantize_mixed`).

`quantize_model` changes the model in memory so its logits are the ones the saved checkpoint gives;
`save_quantized` writes the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from moeprune.compress.quant_format import (FORMAT_MIXED_PACKED, FORMAT_PACKED, MixedBudget, QuantResult,
                                           serving_note)
from moeprune.compress.quantize_plan import (CHANNEL, SUPPORTED_BITS, check_quantize, checkpoint_patterns,
                                             quant_targets)
from moeprune.compress.rtn import fake_quantize, group_scale
from moeprune.errors import MoePruneError

__all__ = ["MixedBudget", "QuantResult", "quantize_model", "save_quantized", "write_quantized", "SUPPORTED_BITS",
           "fake_quantize", "check_quantize", "CHANNEL", "serving_note", "METHODS", "uniform_result",
           "write_values", "pack_checkpoint", "dequantized_tensors"]

METHODS = ("rtn", "gptq")  # uniform mode: round to nearest, or GPTQ from calibration data (compress/gptq.py)

def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _quantize_uniform(model: nn.Module, adapter, *, bits: int, group_size, method: str = "rtn",
                      calibration=None, gptq=None, log=None) -> QuantResult:
    from moeprune.compress.gptq import GPTQOptions, gptq_quantize_layers

    group_size = check_quantize(model, bits, group_size)
    plan = quant_targets(model, adapter)
    before = _weight_bytes(model)
    targets = [name for name, _ in plan.linears]
    details = gptq_quantize_layers(model, adapter, None if calibration is None else list(calibration), bits=bits,
                                   group_size=group_size, targets=targets, options=gptq or GPTQOptions(),
                                   method=method, log=log)
    return uniform_result(model, adapter, bits=bits, group_size=group_size, method=method, details=details,
                          bytes_before=before)


def uniform_result(model: nn.Module, adapter, *, bits: int, group_size, method: str, details: dict | None,
                   bytes_before: int | None = None) -> QuantResult:
    """The record of a uniform quantization of `model` (loaded or weightless: only names and shapes are read):
    which checkpoint keys are packed or kept, and the bytes expected on disk."""
    spec = adapter.spec
    plan = quant_targets(model, adapter)
    before = _weight_bytes(model) if bytes_before is None else bytes_before
    targets, ignore = [name for name, _ in plan.linears], plan.ignore
    modules = dict(model.named_modules())
    pattern, kept_pattern = checkpoint_patterns(adapter)
    lay = spec.layout
    tensors = [getattr(layer.experts, t) for layer in adapter.layers for t in (lay.gate_up, lay.down)]
    tensors += [modules[n].weight for n in targets]
    quant_numel = sum(t.numel() for t in tensors)
    n_scales = sum(t.numel() // ((t.shape[-2] if lay.transposed and t.dim() == 3 else t.shape[-1])
                                 if group_size == CHANNEL else group_size) for t in tensors)
    elem = next(model.parameters()).element_size()
    after = before - quant_numel * elem + quant_numel * bits // 8 + n_scales * elem  # scales in the model dtype
    channel = group_size == CHANNEL
    return QuantResult(format=FORMAT_PACKED, bits=bits, group_size=None if channel else group_size,
                       strategy="channel" if channel else "group", expert_pattern=pattern,
                       kept_pattern=kept_pattern,
                       dense_targets=targets, ignore=ignore,
                       layer_bits={str(layer.index): bits for layer in adapter.layers},
                       bytes_before=before, bytes_after=after, method=method, method_details=details)


def quantize_model(model: nn.Module, *, bits: int, group_size=None, mixed: MixedBudget | None = None,
                   importance: dict[int, float] | None = None, method: str = "rtn", calibration=None,
                   gptq=None, log=None, mixed_format: str = "float8", widths=None) -> QuantResult:
    """Quantize `model` in place (weight-only) and return what `save_quantized` needs.

    Args:
        bits: 4 or 8. Uniform mode quantizes experts and linear layers to this width.
        group_size: weights per scale along the input dim (uniform mode): None/"auto" (the largest of
            128/64/32 dividing every quantized width, else one scale per row), "channel", or an integer
            that divides every quantized width.
        mixed: a `MixedBudget`; then each MoE layer's experts are float8 or left dense, chosen to
            maximise sum(layer importance * bits) within the budget (`bits` must be 8).
        importance: {layer index: importance >= 0} (required with `mixed`), e.g. summed REAP scores.
        method: "rtn" (round to nearest) or "gptq" (uniform mode only; needs `calibration`).
        calibration: batches of {"input_ids", "attention_mask"} (e.g. `load_calibration(...).batches`).
        gptq: a `moeprune.compress.gptq.GPTQOptions` (default: 1% dampening, no act-order, blocks of 128).
        log: a callable given one line per decoder layer (GPTQ progress).
        mixed_format: with `mixed`, "float8" (torchao float8 or dense per MoE layer; transformers reloads it) or
            "packed" (int4 / int8 / dense per MoE layer as compressed-tensors config groups; vLLM serves it,
            transformers cannot load it); `widths` the packed candidates (default 4, 8, 16 = dense).
    """
    from moeprune.models import MoEAdapter

    if bits not in SUPPORTED_BITS:
        raise MoePruneError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if method not in METHODS:
        raise MoePruneError(f"quantization method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if method == "gptq" and mixed is not None:
        raise MoePruneError("--method gptq applies to uniform quantization; mixed precision (--mixed-budget, "
                            "--max-bytes) is float8 per layer and uses no calibration")
    if method == "gptq" and calibration is None:
        raise MoePruneError("--method gptq needs calibration data")
    adapter = MoEAdapter(model)
    if mixed is None:
        return _quantize_uniform(model, adapter, bits=bits, group_size=group_size, method=method,
                                 calibration=calibration, gptq=gptq, log=log)
    if mixed_format == "packed":
        from moeprune.compress.quantize_mixed import PACKED_WIDTHS, quantize_mixed_packed

        return quantize_mixed_packed(model, adapter, budget=mixed, importance=importance,
                                     widths=widths or PACKED_WIDTHS, group_size=group_size)
    if mixed_format != "float8":
        raise MoePruneError(f"--mixed-format {mixed_format!r}: choose float8 or packed")
    from moeprune.compress.quantize_mixed import quantize_mixed

    return quantize_mixed(model, adapter, bits=bits, budget=mixed, importance=importance)


def _compress_tensor(w: torch.Tensor, *, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scale = group_scale(w, bits=bits, group_size=CHANNEL if group_size is None else group_size).to(w.dtype)
    packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, _scheme(bits, group_size))
    return {name: t.contiguous() for name, t in packed.items()}


def _scheme(bits: int, group_size: int | None):
    """compressed-tensors scheme: groups of `group_size` along the input dim, or per row when None."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if group_size is None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


def _compress_shard(path: Path, result: QuantResult, found: set[str], kept: set[str]) -> dict[str, str]:
    """Rewrite one safetensors shard; returns {new key: shard file name} for the index."""
    from safetensors.torch import load_file, save_file

    dense = set(result.dense_targets)
    tensors, out = load_file(path), {}
    for key, w in tensors.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        match = re.match(result.expert_pattern, key) if module is not None else None
        bits = result.bits
        if match is not None and result.format == FORMAT_MIXED_PACKED:
            bits = result.layer_bits[match.group(1)]  # this MoE layer's width; 16: left dense
            match = match if bits < 16 else None
        if match is not None and w.dim() != 2:
            raise MoePruneError(f"{key} is stored fused ({tuple(w.shape)}) in this architecture's checkpoint; "
                                "pack-quantized storage needs per-expert 2-D weights (use the float8 mixed mode)")
        if module is not None and re.match(result.kept_pattern, key):
            kept.add(module)
        if match is not None or module in dense:
            found.add(module)
            for name, t in _compress_tensor(w, bits=bits, group_size=result.group_size).items():
                out[f"{module}.{name}"] = t
        else:
            out[key] = w
    save_file(out, path, metadata={"format": "pt"})
    return {key: path.name for key in out}


def _group(bits: int, group_size: int | None, targets: list[str]) -> dict:
    return {"targets": targets, "weights": _scheme(bits, group_size).weights.model_dump(),
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}


def _quantization_config(result: QuantResult, kept: set[str]) -> dict:
    groups = {"group_0": _group(result.bits, result.group_size, ["Linear"])}
    if result.format == FORMAT_MIXED_PACKED:  # one group per width, targeting its layers' expert linears
        groups = {}
        prefix, _, rest = result.expert_pattern.partition("(")  # ^layers\.(0|1|...)\.(.+\.)?experts\.
        rest = rest.split(")", 1)[1]
        for bits in sorted({b for b in result.layer_bits.values() if b < 16}):
            alt = "|".join(i for i, b in sorted(result.layer_bits.items(), key=lambda kv: int(kv[0])) if b == bits)
            groups[f"group_{bits}"] = _group(bits, result.group_size, [f"re:{prefix}({alt}){rest}\\d+\\.[^.]+$"])
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(set(result.ignore) | kept), "kv_cache_scheme": None}


def write_values(folder: Path, values) -> None:
    """Replace tensors in the safetensors shards of `folder` (in place) by `values` (`Replacements`: on-disk name
    -> tensor), each cast to the dtype its shard stores; every name must be found, with its shape."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    wanted, found = set(values.names()), set()
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            hit = wanted & set(f.keys())
            metadata = f.metadata()
        if not hit:
            continue
        tensors = load_file(shard)
        for name in sorted(hit):
            value = values.load(name)
            if tuple(value.shape) != tuple(tensors[name].shape):
                raise MoePruneError(f"{name}: quantized shape {list(value.shape)} does not match the "
                                    f"checkpoint's {list(tensors[name].shape)} in {shard.name}")
            tensors[name] = value.to(tensors[name].dtype).contiguous()
        save_file(tensors, shard, metadata=metadata)
        found |= hit
    missing = sorted(wanted - found)
    if missing:
        raise MoePruneError(f"quantized tensors {missing[:3]} are not in the checkpoint written to {folder}")


def pack_checkpoint(folder: Path, result: QuantResult) -> None:
    """Pack the quantized tensors of the checkpoint in `folder` (in place) as `result` says, and record the
    quantization in its config.json."""
    _compress_checkpoint(Path(folder), result)


def _compress_checkpoint(folder: Path, result: QuantResult) -> None:
    index_file = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    found: set[str] = set()
    kept: set[str] = set()  # routers / shared-expert gates under their on-disk names (vLLM reads those)
    weight_map = {}
    for shard in shards:
        weight_map.update(_compress_shard(shard, result, found, kept))
    missing = sorted(set(result.dense_targets) - found)
    if missing:
        raise MoePruneError(f"linear layers {missing[:3]} were not found under their module names in the saved "
                            "checkpoint; this architecture renames weights on save and cannot be packed")
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = sum(s.stat().st_size for s in shards)
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = _quantization_config(result, kept)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def dequantized_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a pack-quantized checkpoint folder as dense tensors (checkpoint names, scale dtype): each
    packed module's width and group size read from its own tensors (int32 words per row, scales per row), so
    per-layer widths decode too. A reference for engines that load what transformers cannot."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for key, t in tensors.items():
        if key.endswith((".weight_scale", ".weight_shape")):
            continue
        if not key.endswith(".weight_packed"):
            out[key] = t
            continue
        module = key[: -len(".weight_packed")]
        scale = tensors[f"{module}.weight_scale"]
        rows, width = (int(x) for x in tensors[f"{module}.weight_shape"])
        bits = 32 * t.shape[-1] // width
        group = None if scale.shape[-1] == 1 else width // scale.shape[-1]
        packed = {"weight_packed": t, "weight_scale": scale, "weight_shape": tensors[f"{module}.weight_shape"]}
        out[f"{module}.weight"] = PackedQuantizationCompressor.decompress(packed, _scheme(bits, group))["weight"].to(
            scale.dtype).reshape(rows, width)
    return out


def save_quantized(model: nn.Module, result: QuantResult, out_dir: str | Path, *,
                   source_dir: str | Path | None = None, provenance: dict | None = None,
                   overwrite: bool = False, inputs=()) -> Path:
    """Write the quantized model (from `quantize_model`) as a checkpoint stock transformers reloads; `inputs`
    are the other files and folders the command read (the output may not be, hold or sit inside one)."""
    from moeprune.checkpoint.writer import atomic_output_dir

    with atomic_output_dir(out_dir, inputs=(source_dir, *inputs), overwrite=overwrite) as tmp:
        write_quantized(model, result, tmp, source_dir=source_dir, provenance=provenance)
    return Path(out_dir).expanduser().resolve()


def write_quantized(model: nn.Module, result: QuantResult, folder: Path, *, source_dir: str | Path | None = None,
                    provenance: dict | None = None) -> None:
    """Write the quantized checkpoint into an existing (temporary) folder."""
    from moeprune.checkpoint.writer import write_checkpoint

    record = {**(provenance or {}), "quantization": result.to_dict()}
    write_checkpoint(model, folder, source_dir=source_dir, provenance=record)
    if result.format in (FORMAT_PACKED, FORMAT_MIXED_PACKED):
        _compress_checkpoint(Path(folder), result)
