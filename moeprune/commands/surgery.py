"""`moeprune inspect` and `moeprune prune`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moeprune.cli import cli
from moeprune.commands.pipeline_cmds import calibration_options, recipe_from_cli
from moeprune.errors import MoePruneError
from moeprune.units import human_bytes

__all__ = ["inspect_cmd", "prune_cmd", "format_summary"]


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
        lines.append(f"{kind:<10}{s.params[kind]:>16,}{human_bytes(s.bytes[kind]):>14}{100 * s.params[kind] / total:>7.1f}%")
    if s.files_bytes:
        lines.append(f"\nsafetensors on disk: {human_bytes(s.files_bytes)}")
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(model_dir: str, as_json: bool) -> None:
    """Show the architecture, MoE layers, experts and the expert/non-expert split of MODEL_DIR."""
    from moeprune.inspect import inspect_model

    summary = inspect_model(model_dir)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary))


def _method_options(fn):
    for option in reversed([
        click.option("--ratio", type=float, default=None, help="Fraction of experts to drop per layer, in (0, 1)."),
        click.option("--keep-experts", type=int, default=None, help="Experts to keep per layer (instead of --ratio)."),
        click.option("--observations", "obs_dir", type=click.Path(), default=None,
                     help="Saved observations (moeprune observe) instead of a calibration pass."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder."),
    ]):
        fn = option(fn)
    return calibration_options(fn)


@cli.command("prune")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--keep", "keep_file", type=click.Path(), help="KEEP.json: {\"<layer>\": [kept expert indices]}.")
@click.option("--method", default=None,
              help="reap, reap_prob, ean, ean_mean, frequency, soft_frequency, random, reconstruct, reconstruct_progressive.")
@click.option("--no-protect", is_flag=True, help="Allow dropping super experts.")
@_method_options
def prune_cmd(model_dir: str, out_dir: str, keep_file: str | None, method: str | None, no_protect: bool,
              **opts) -> None:
    """Remove experts from MODEL_DIR and write a checkpoint stock transformers loads.

    Either apply a selection computed elsewhere (--keep KEEP.json) or score experts with --method and
    --ratio / --keep-experts, from --observations or a calibration pass (--calib).
    """
    from moeprune.compress import load_keep_file, prune_experts, save_compressed, validate_keep
    from moeprune.io import check_output_dir, load_model, meta_model, resolve_model_dir
    from moeprune.models import MoEAdapter
    from moeprune.pipeline.methods import MERGE_METHODS

    src = resolve_model_dir(model_dir)
    if (keep_file is None) == (method is None):
        raise MoePruneError("prune needs either --keep KEEP.json or --method METHOD with --ratio/--keep-experts")
    if method in MERGE_METHODS:
        raise MoePruneError(f"{method} merges experts: use `moeprune merge --method {method}`")
    if method is not None:
        _compress_with_method(src, out_dir, method=method, protect=not no_protect, **opts)
        return
    plan = load_keep_file(keep_file)
    # Everything that can be checked is checked before the (possibly long) load of the weights.
    validate_keep(MoEAdapter(meta_model(src)), plan, where=str(keep_file))
    check_output_dir(out_dir, inputs=(src,), overwrite=opts["overwrite"])
    model = load_model(src, dtype="auto", device="cpu")
    kept = prune_experts(model, plan, where=str(keep_file))
    save_compressed(model, out_dir, source_dir=src, overwrite=opts["overwrite"],
                    provenance={"base_model": str(src), "method": "keep-file", "keep_file": str(keep_file),
                                "kept": kept})
    click.echo(f"kept {len(next(iter(kept.values())))} experts in each of {len(kept)} MoE layers -> "
               f"{Path(out_dir).resolve()}")


@cli.command("merge")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--method", default="hc_smoe", show_default=True, type=click.Choice(["hc_smoe", "m_smoe"]))
@click.option("--linkage", default="average", show_default=True,
              type=click.Choice(["average", "single", "complete", "ward"]), help="hc_smoe clustering linkage.")
@click.option("--router", default="dominant", show_default=True, type=click.Choice(["dominant", "weighted"]),
              help="Router row of a merged expert: its dominant member's, or the frequency-weighted average.")
@click.option("--align/--no-align", default=None, help="Align neurons before averaging (default: m_smoe only).")
@_method_options
def merge_cmd(model_dir: str, out_dir: str, method: str, linkage: str, router: str, align: bool | None, **opts):
    """Merge clusters of experts of MODEL_DIR into one expert each; the checkpoint shrinks."""
    from moeprune.io import resolve_model_dir

    merge = {"linkage": linkage, "router": router, "align": align}
    _compress_with_method(resolve_model_dir(model_dir), out_dir, method=method, merge=merge, **opts)


def _compress_with_method(src, out_dir, *, method, ratio, keep_experts, obs_dir, overwrite, **calib):
    from moeprune.compress import save_compressed
    from moeprune.io import check_output_dir, load_model, load_tokenizer, meta_model
    from moeprune.models import MoEAdapter
    from moeprune.observe import Observations
    from moeprune.pipeline.methods import apply_decision, decide, method_collect
    from moeprune.pipeline.run import get_observations, load_recipe_calibration
    from moeprune.score import experts_to_keep

    recipe = recipe_from_cli(str(src), method=method, ratio=ratio, keep=keep_experts, **calib)
    shape = MoEAdapter(meta_model(src))
    experts_to_keep(shape.num_experts, ratio=ratio, keep=keep_experts, top_k=shape.top_k,
                    where="--ratio/--keep-experts")
    check_output_dir(out_dir, inputs=(src,), overwrite=overwrite)
    model = load_model(src, dtype=calib["dtype"])
    tokenizer = load_tokenizer(src)
    if obs_dir is not None:
        obs = Observations.load(obs_dir)
        obs.check_model(model, where=f"observations in {obs_dir}")
        missing = set(method_collect(method)) - set(obs.meta.get("collected", []))
        if missing:
            raise MoePruneError(f"observations in {obs_dir} lack {sorted(missing)} needed by {method}; re-run "
                                f"`moeprune observe --collect {','.join(sorted(missing))}`")
    else:
        obs, _ = get_observations(model, tokenizer, recipe, log=click.echo)
    decision = decide(model, obs, recipe, calibration=lambda: load_recipe_calibration(recipe, tokenizer))
    sel = decision.selection
    if sel.protected:
        click.echo(f"protected super experts: {sel.protected}")
    kept = apply_decision(model, decision, obs, recipe)
    provenance = {"base_model": str(src), "method": method, "ratio": ratio, "kept": kept, "dropped": sel.dropped,
                  "protected": sel.protected, "scores": sel.scores, "calibration": obs.meta.get("calibration")}
    if decision.merge_plan is not None:
        provenance["merged"] = decision.merge_plan.clusters
        provenance["merge_options"] = recipe.merge.model_dump()
    save_compressed(model, out_dir, source_dir=src, overwrite=overwrite, provenance=provenance)
    verb = "merged into" if decision.merge_plan is not None else "kept"
    click.echo(f"{method}: {verb} {len(next(iter(kept.values())))} experts in each of {len(kept)} MoE layers -> "
               f"{Path(out_dir).resolve()}")
