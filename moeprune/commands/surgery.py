"""`moeprune inspect` and `moeprune prune`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moeprune.cli import cli
from moeprune.errors import MoePruneError

__all__ = ["inspect_cmd", "prune_cmd", "format_summary"]


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def format_summary(summary) -> str:
    s = summary
    counts = sorted(set(s.experts_per_layer.values()))
    lines = [
        f"architecture   {s.architecture} ({s.model_type})",
        f"layers         {s.num_layers} ({len(s.moe_layers)} MoE: {', '.join(map(str, s.moe_layers))})",
        f"experts/layer  {', '.join(map(str, counts))}   top-k {s.top_k}   dtype {s.dtype}",
        "",
        f"{'part':<10}{'parameters':>16}{'bytes':>14}{'share':>8}",
    ]
    total = s.params["total"] or 1
    for kind in ("expert", "router", "shared", "other", "total"):
        lines.append(f"{kind:<10}{s.params[kind]:>16,}{_human(s.bytes[kind]):>14}{100 * s.params[kind] / total:>7.1f}%")
    if s.files_bytes:
        lines.append(f"\nsafetensors on disk: {_human(s.files_bytes)}")
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(model_dir: str, as_json: bool) -> None:
    """Show the architecture, MoE layers, experts and the expert/non-expert split of MODEL_DIR."""
    from moeprune.inspect import inspect_model

    summary = inspect_model(model_dir)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary))


@cli.command("prune")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--keep", "keep_file", type=click.Path(), help="KEEP.json: {\"<layer>\": [kept expert indices]}.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--dtype", default="auto", show_default=True, help="Load dtype (auto keeps the checkpoint's).")
def prune_cmd(model_dir: str, out_dir: str, keep_file: str | None, overwrite: bool, dtype: str) -> None:
    """Remove experts from MODEL_DIR and write a checkpoint stock transformers loads."""
    from moeprune.compress import load_keep_file, prune_experts, save_compressed, validate_keep
    from moeprune.io import check_output_dir, load_model, meta_model, resolve_model_dir
    from moeprune.models import MoEAdapter

    src = resolve_model_dir(model_dir)
    if keep_file is None:
        raise MoePruneError("prune needs --keep KEEP.json (a map of layer index to kept expert indices)")
    plan = load_keep_file(keep_file)
    # Everything that can be checked is checked before the (possibly long) load of the weights.
    validate_keep(MoEAdapter(meta_model(src)), plan, where=str(keep_file))
    check_output_dir(out_dir, inputs=(src,), overwrite=overwrite)
    model = load_model(src, dtype=dtype, device="cpu")
    kept = prune_experts(model, plan, where=str(keep_file))
    save_compressed(model, out_dir, source_dir=src, overwrite=overwrite,
                    provenance={"base_model": str(src), "method": "keep-file", "kept": kept})
    n = len(next(iter(kept.values())))
    click.echo(f"kept {n} experts in each of {len(kept)} MoE layers -> {Path(out_dir).resolve()}")
