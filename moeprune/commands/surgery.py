"""`moeprune inspect` and `moeprune prune`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moeprune.cli import cli
from moeprune.commands.pipeline_cmds import calibration_options, recipe_from_cli
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
@click.option("--method", default=None, help="Scoring method (reap, ean, frequency, ...) instead of --keep.")
@click.option("--ratio", type=float, default=None, help="Fraction of experts to drop per layer, in (0, 1).")
@click.option("--keep-experts", type=int, default=None, help="Experts to keep per layer (instead of --ratio).")
@click.option("--observations", "obs_dir", type=click.Path(), default=None,
              help="Saved observations (moeprune observe) instead of a calibration pass.")
@click.option("--no-protect", is_flag=True, help="Allow dropping super experts.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@calibration_options
def prune_cmd(model_dir: str, out_dir: str, keep_file: str | None, method: str | None, ratio: float | None,
              keep_experts: int | None, obs_dir: str | None, no_protect: bool, overwrite: bool, **calib) -> None:
    """Remove experts from MODEL_DIR and write a checkpoint stock transformers loads.

    Either apply a selection computed elsewhere (--keep KEEP.json) or score experts with --method and
    --ratio / --keep-experts, from --observations or a calibration pass (--calib).
    """
    from moeprune.compress import load_keep_file, prune_experts, save_compressed, validate_keep
    from moeprune.io import check_output_dir, load_model, meta_model, resolve_model_dir
    from moeprune.models import MoEAdapter

    src = resolve_model_dir(model_dir)
    if (keep_file is None) == (method is None):
        raise MoePruneError("prune needs either --keep KEEP.json or --method METHOD with --ratio/--keep-experts")
    adapter = MoEAdapter(meta_model(src))
    if keep_file is not None:
        plan = load_keep_file(keep_file)
        # Everything that can be checked is checked before the (possibly long) load of the weights.
        validate_keep(adapter, plan, where=str(keep_file))
        provenance = {"method": "keep-file", "keep_file": str(keep_file)}
    else:
        recipe = recipe_from_cli(str(src), method=method, ratio=ratio, keep=keep_experts, **calib)
        from moeprune.score import experts_to_keep

        experts_to_keep(adapter.num_experts, ratio=ratio, keep=keep_experts, top_k=adapter.top_k,
                        where="--ratio/--keep-experts")
    check_output_dir(out_dir, inputs=(src,), overwrite=overwrite)
    model = load_model(src, dtype=calib["dtype"] if method else "auto", device="cpu" if keep_file else None)
    if method is not None:
        plan, provenance = _select(model, src, recipe, obs_dir, protect=not no_protect)
    kept = prune_experts(model, plan, where=str(keep_file or "selection"))
    save_compressed(model, out_dir, source_dir=src, overwrite=overwrite,
                    provenance={"base_model": str(src), **provenance, "kept": kept})
    n = len(next(iter(kept.values())))
    click.echo(f"kept {n} experts in each of {len(kept)} MoE layers -> {Path(out_dir).resolve()}")


def _select(model, src, recipe, obs_dir, *, protect: bool):
    from moeprune.io import load_tokenizer
    from moeprune.models import MoEAdapter
    from moeprune.observe import Observations
    from moeprune.pipeline import get_observations
    from moeprune.score import select_experts

    if obs_dir is not None:
        obs = Observations.load(obs_dir)
        obs.check_model(model, where=f"observations in {obs_dir}")
    else:
        obs, _ = get_observations(model, load_tokenizer(src), recipe, log=click.echo)
    sel = select_experts(obs, MoEAdapter(model), method=recipe.method, ratio=recipe.ratio, keep=recipe.keep,
                         protect_super=protect, seed=recipe.seed, where="prune")
    if sel.protected:
        click.echo(f"protected super experts: {sel.protected}")
    return sel.kept, {"method": sel.method, "ratio": recipe.ratio, "protected": sel.protected,
                      "dropped": sel.dropped, "scores": sel.scores, "calibration": obs.meta.get("calibration")}
