"""`moeprune quantize`: weight-only 4/8-bit quantization, uniform or importance-aware mixed per layer."""

from __future__ import annotations

import math
from pathlib import Path

import click

from moeprune.errors import MoePruneError

__all__ = ["quantize_cmd", "parse_number", "layer_importance"]


def parse_number(text: str | None, *, option: str, integer: bool = False) -> float | int | None:
    """A user's number, or a one-line error naming the option."""
    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise MoePruneError(f"{option} must be {kind}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise MoePruneError(f"{option} must be positive, got {text!r}")
    return value


def layer_importance(obs_dir: str, *, method: str, model) -> dict[int, float]:
    """{layer: sum of the experts' scores} from saved observations (never-routed experts count 0)."""
    from moeprune.observe.stats import Observations
    from moeprune.score import score_layer

    obs = Observations.load(obs_dir)
    obs.check_model(model, where=str(obs_dir))
    out = {}
    for index, stats in obs.layers.items():
        scores = score_layer(method, stats, layer=index)
        out[index] = float(scores.masked_fill(~scores.isfinite(), 0.0).clamp(min=0).sum())
    return out


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@click.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (new or empty).")
@click.option("--bits", default="4", show_default=True, help="Weight width: 4 or 8.")
@click.option("--group-size", default="auto", show_default=True,
              help="Weights per scale (uniform mode): an integer, 'channel' (one scale per row), or 'auto' "
                   "(the largest of 128/64/32 dividing every quantized width, else 'channel').")
@click.option("--mixed-budget", "avg_bits", default=None,
              help="Mixed precision: average bits per routed-expert weight (scales included).")
@click.option("--max-bytes", default=None, help="Mixed precision: total bytes allowed for all weights.")
@click.option("--observations", "obs_dir", type=click.Path(), default=None,
              help="Saved observations (moeprune observe): the importance that drives mixed precision.")
@click.option("--method", default="reap", show_default=True, help="Scoring method for the importance.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--execution", default="auto", show_default=True, type=click.Choice(["auto", "memory", "layerwise"]),
              help="Quantization needs the model in memory: layerwise (or auto when it does not fit) is refused.")
@click.option("--max-memory", default=None, help="Memory budget, e.g. 24GB (default: free memory of the device).")
def quantize_cmd(model_dir: str, out_dir: str, bits: str, group_size: str, avg_bits: str | None,
                 max_bytes: str | None, obs_dir: str | None, method: str, overwrite: bool, device: str, execution: str,
                 max_memory: str | None) -> None:
    """Quantize the weights of MODEL_DIR (experts included) into a checkpoint stock transformers reloads.

    Uniform: every expert and linear layer at --bits (compressed-tensors pack-quantized); routers,
    shared-expert gates and lm_head stay in the source dtype. Mixed (--mixed-budget or --max-bytes, with
    --observations): each MoE layer's experts float8 or dense, the most important layers kept dense
    within the budget (transformers-only: vLLM refused it as tested, see docs/serving.md).
    """
    from moeprune.compress.quantize import SUPPORTED_BITS, MixedBudget, quantize_model, save_quantized, serving_note
    from moeprune.compress.quantize_plan import check_quantize, parse_group_size
    from moeprune.checkpoint.writer import check_output_dir, portable_path
    from moeprune.checkpoint.model_dir import load_model, meta_model, resolve_model_dir

    n_bits = parse_number(bits, option="--bits", integer=True)
    if n_bits not in SUPPORTED_BITS:
        raise MoePruneError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    group = parse_group_size(group_size)
    mixed = None
    if avg_bits is not None or max_bytes is not None:
        mixed = MixedBudget(avg_bits=parse_number(avg_bits, option="--mixed-budget"),
                            max_bytes=parse_number(max_bytes, option="--max-bytes", integer=True))
        if obs_dir is None:
            raise MoePruneError("mixed precision needs --observations DIR (from `moeprune observe`) for importance")
    src = resolve_model_dir(model_dir)
    check_output_dir(out_dir, inputs=(src, obs_dir), overwrite=overwrite)
    where = _placement(src, device, execution, max_memory)
    if mixed is None:  # group size against every quantized width, before any weight is read
        group = check_quantize(meta_model(src), n_bits, group)
    model = load_model(src, dtype=where.source_dtype, device=str(where.device))
    importance = layer_importance(obs_dir, method=method, model=model) if mixed is not None else None
    result = quantize_model(model, bits=n_bits, group_size=group, mixed=mixed, importance=importance)
    provenance = {"base_model": portable_path(src), "method": "quantize",
                  "importance_method": method if mixed else None}
    out = save_quantized(model, result, out_dir, source_dir=src, provenance=provenance, overwrite=overwrite,
                         inputs=(obs_dir,))
    before, after = _disk_bytes(src), _disk_bytes(out)
    widths = sorted(set(result.layer_bits.values()))
    click.echo(f"{result.format}{_grouping(result)}: layer widths {widths}, safetensors {before:,} -> {after:,} "
               f"bytes ({after / max(before, 1):.1%}) -> {out}")
    click.echo(f"serves in: {serving_note(result)}")


def _placement(src, device: str, execution: str, max_memory):
    """The model loads in its own dtype; a model that does not fit in memory is refused before any weight."""
    from moeprune.checkpoint.model_dir import meta_model
    from moeprune.pipeline.plan import placement

    where = placement(src, meta_model(src), dtype="auto", device=device, execution=execution, max_memory=max_memory)
    if where.execution == "layerwise":
        raise MoePruneError(f"quantize needs the whole model in memory ({where.reason}); quantize the pruned or "
                            "merged output instead (`moeprune prune ... -o OUT` first: it is smaller), or raise "
                            "--max-memory on a larger machine")
    return where


def _grouping(result) -> str:
    if result.strategy == "channel":
        return ", one scale per output row (channel)"
    return f", group size {result.group_size}" if result.group_size else ""
