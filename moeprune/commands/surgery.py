"""`moeprune inspect` and `moeprune prune`."""

from __future__ import annotations

import json
from pathlib import Path

import click

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


@click.command("inspect")
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
        click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder."),
        click.option("--recover", type=click.Choice(["router_kd", "router_kd_block", "moe_kd", "moe_kd_block"]),
                     default=None,
                     help="Recovery after compression: router_kd trains only the routers against the original "
                          "model's next-token distribution (in-memory execution); router_kd_block trains each "
                          "MoE layer's router so the block's output matches the original block's (in memory or "
                          "layer-wise); moe_kd / moe_kd_block train every MoE-block weight (router, surviving "
                          "and shared experts) with the same objectives."),
        click.option("--gate-scale", type=click.Choice(["keep", "auto", "renormalize", "no_renormalize"]),
                     default=None, help="Renormalise the surviving top-k gates or not (config flag such as "
                                        "norm_topk_prob); auto measures both on held-back calibration tokens. "
                                        "Without --recover, only this choice is made."),
        click.option("--recover-batch-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                     help="router_kd_block, moe_kd_block: tokens per optimizer step."),
        click.option("--recover-steps", type=click.IntRange(min=1), default=None,
                     help="Recovery optimizer steps (logit KD: one calibration batch each; *_block: per MoE layer) "
                          "[default: 100 for router_*, 400 for moe_*]."),
        click.option("--recover-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Recovery learning rate (Adam) [default: 1e-3 for router_*, 3e-4 for moe_*]."),
        click.option("--recover-tokens", type=click.IntRange(min=1), default=None,
                     help="Calibration tokens recovery trains on [default: 16384 for router_*, 131072 for moe_*]."),
        click.option("--recover-generate", type=click.IntRange(min=1), default=None, metavar="N",
                     help="router_kd, moe_kd: also train on N continuations of each training calibration row "
                          "sampled from the original model, up to --recover-tokens in all."),
        click.option("--recover-parallel", type=click.Choice(["auto", "data", "sharded"]), default="auto",
                     show_default=True,
                     help="router_kd, moe_kd under torchrun: data-parallel (each rank holds the training state), "
                          "or moe_kd's state sharded over the ranks by FSDP2; auto = data when it fits."),
    ]):
        fn = option(fn)
    return calibration_options(fn)


@click.command("prune")
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
    --ratio / --keep-experts, from --observations or a calibration pass (--calib). Models larger than
    memory run layer by layer (--execution layerwise, chosen by itself under --max-memory).
    """
    from moeprune.methods import get_method

    if (keep_file is None) == (method is None):
        raise MoePruneError("prune needs either --keep KEEP.json or --method METHOD with --ratio/--keep-experts")
    if method is not None and get_method(method, where="--method").kind == "merge":
        raise MoePruneError(f"{method} merges experts: use `moeprune merge --method {method}`")
    if keep_file is not None:
        if opts["ratio"] is not None or opts["keep_experts"] is not None:
            raise MoePruneError("--keep KEEP.json lists the experts to keep; drop --ratio/--keep-experts")
        _compress(model_dir, out_dir, method="keep_file", keep_file=keep_file, **opts)
        return
    _compress(model_dir, out_dir, method=method, protect=not no_protect, **opts)


@click.command("merge")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--method", default="hc_smoe", show_default=True, type=click.Choice(["hc_smoe", "m_smoe", "ream"]))
@click.option("--linkage", default="average", show_default=True,
              type=click.Choice(["average", "single", "complete", "ward"]), help="hc_smoe clustering linkage.")
@click.option("--router", default="dominant", show_default=True, type=click.Choice(["dominant", "weighted"]),
              help="Router row of a merged expert: its dominant member's, or the frequency-weighted average.")
@click.option("--align/--no-align", default=None, help="Align neurons before averaging (default: m_smoe, ream).")
@click.option("--group-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="ream: 0 = every expert joins its most similar centroid; C > 0 = groups of at most C experts.")
@_method_options
def merge_cmd(model_dir: str, out_dir: str, method: str, linkage: str, router: str, align: bool | None,
              group_size: int, **opts):
    """Merge clusters of experts of MODEL_DIR into one expert each; the checkpoint shrinks."""
    merge = {"linkage": linkage, "router": router, "align": align, "group_size": group_size}
    _compress(model_dir, out_dir, method=method, merge=merge, **opts)


def _compress(model_dir, out_dir, *, method, ratio=None, keep_experts=None, obs_dir=None, overwrite=False,
              max_shard_size="5GB", recover=None, recover_steps=None, recover_lr=None, recover_tokens=None,
              gate_scale=None, recover_batch_tokens=512, recover_generate=None, recover_parallel="auto", **calib):
    """`prune` and `merge` build a recipe and run the same pipeline as `moeprune run` (no evaluation)."""
    from moeprune.commands.pipeline_cmds import echo_result
    from moeprune.pipeline.run import run_recipe

    if recover is not None or gate_scale is not None:
        calib["recover"] = {"method": recover or "none", "steps": recover_steps, "lr": recover_lr,
                            "tokens": recover_tokens, "batch_tokens": recover_batch_tokens,
                            "gate_scale": gate_scale or "keep", "generate": recover_generate,
                            "parallel": recover_parallel}
    recipe = recipe_from_cli(model_dir, method=method, ratio=ratio, keep=keep_experts, **calib)
    recipe.max_shard_size = max_shard_size
    report = run_recipe(recipe, out_dir=out_dir, overwrite=overwrite, log=click.echo, observations_dir=obs_dir,
                        save_observations=False)
    echo_result(report, Path(out_dir).expanduser().resolve())
