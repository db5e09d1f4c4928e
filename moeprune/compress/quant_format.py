"""What a quantized checkpoint is: its storage formats, the record of what `quantize_model` did
(`QuantResult`, written into moeprune.json), the mixed-precision budget, and which engines serve it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moeprune.errors import MoePruneError

__all__ = ["FORMAT_PACKED", "FORMAT_MIXED", "FORMAT_MIXED_PACKED", "VLLM_CPU_GROUP_SIZES", "MixedBudget", "QuantResult", "serving_note"]

FORMAT_PACKED = "compressed-tensors/pack-quantized"
FORMAT_MIXED = "torchao/float8-per-layer"
FORMAT_MIXED_PACKED = "compressed-tensors/pack-quantized-per-layer"  # routed experts' width per MoE layer (vLLM)
VLLM_CPU_GROUP_SIZES = (64, 128)  # int4 group sizes vLLM 0.32's CPU MoE kernel serves (measured, docs/serving.md)


@dataclass(frozen=True)
class MixedBudget:
    """A budget for mixed precision: average bits per routed-expert weight, or total bytes of the weights."""

    avg_bits: float | None = None
    max_bytes: int | None = None

    def __post_init__(self):
        if (self.avg_bits is None) == (self.max_bytes is None):
            raise MoePruneError("give exactly one of --mixed-budget AVG_BITS or --max-bytes N")


@dataclass
class QuantResult:
    """What `quantize_model` did: format, widths, which tensors, and the bytes it expects on disk."""

    format: str
    bits: int
    group_size: int | None  # weights per scale; None for "channel" (one scale per row) and for mixed
    strategy: str = "group"  # "group", "channel" (uniform) or "layer" (mixed)
    expert_pattern: str = ""
    kept_pattern: str = ""  # checkpoint keys of routers / shared-expert gates (listed in `ignore` on disk)
    dense_targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    layer_bits: dict[str, int] = field(default_factory=dict)
    allocation: dict | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    method: str = "rtn"  # "rtn": round to nearest (uniform, and the float8 of mixed); "gptq": uniform GPTQ
    method_details: dict | None = None  # GPTQ: options, per-layer experts solved / fallen back to RTN, seconds

    def to_dict(self, *, timings: bool = True) -> dict:
        """The record for report.json; `timings=False` leaves out the seconds per layer (for moeprune.json, which
        both executors write byte for byte)."""
        out = asdict(self)
        out.pop("expert_pattern")
        out.pop("kept_pattern")
        if not timings and out.get("method_details"):
            layers = out["method_details"].get("layers", {})
            out["method_details"]["layers"] = {k: {f: v for f, v in r.items() if f != "seconds"}
                                               for k, r in layers.items()}
        out["serves_in"] = serving_note(self)
        return out


def serving_note(result: "QuantResult | dict") -> str:
    """Which engines load this quantized checkpoint, as measured or documented (see docs/serving.md)."""
    q = result if isinstance(result, dict) else asdict(result)
    if q["format"] == FORMAT_MIXED:
        return "transformers only (vLLM refuses this torchao float8-per-layer checkpoint as tested; docs/serving.md)"
    if q["format"] == FORMAT_MIXED_PACKED:
        widths = sorted({int(b) for b in q.get("layer_bits", {}).values()})
        cpu = ("vLLM CPU (its int4 MoE kernel; dense layers unquantized)" if set(widths) <= {4, 16}
               and q.get("group_size") in VLLM_CPU_GROUP_SIZES else
               "not vLLM CPU (it serves int4 at group 64/128 and dense MoE layers only)")
        return (f"vLLM GPU (expert widths resolved per MoE layer; docs/quantization.md); {cpu}; not transformers "
                "(its loader decodes every layer's experts with one scheme)")
    if q["bits"] != 4:
        cpu = "not vLLM CPU (it has no int8 weight-only kernel)"
    elif q.get("strategy") == "channel" or q.get("group_size") == 32:
        cpu = "not vLLM CPU (its int4 MoE kernel refuses per-row scales and group size 32)"
    elif q.get("group_size") in VLLM_CPU_GROUP_SIZES:  # they divide every width, so widths are multiples of 32
        cpu = ("vLLM CPU (its int4 MoE kernel uses int8 activations, so tokens agree with transformers' per token, "
               "not exactly)")
    else:
        cpu = (f"vLLM CPU not verified for group size {q.get('group_size')} (measured: 64 and 128 serve; 16 on "
               "experts 112 wide loads and generates garbage: its int4 MoE kernel tiles widths by 32)")
    return f"transformers; vLLM GPU (documented upstream, not verified here); {cpu}; docs/serving.md"
