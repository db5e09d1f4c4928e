"""`moeprune observe` and `moeprune run`; method-driven pruning lives in `prune` (surgery.py)."""

from __future__ import annotations

import json

import click

from moeprune import distributed

__all__ = ["observe_cmd", "observe_merge_cmd", "run_cmd", "calibration_options", "execution_options",
           "recipe_from_cli", "echo_result", "observe_to"]


def execution_options(fn):
    """Where the weights live: shared by every command that touches weights."""
    for option in reversed([
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Compute dtype; auto = the checkpoint's own. Outputs always keep the source dtype."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--execution", default="auto", show_default=True,
                     type=click.Choice(["auto", "memory", "layerwise"]),
                     help="memory: load the whole model; layerwise: one decoder layer at a time; auto: "
                          "layerwise when the model does not fit in --max-memory."),
        click.option("--max-memory", default=None,
                     help="Memory budget, e.g. 24GB or 500MiB (default: free memory of the device)."),
    ]):
        fn = option(fn)
    return fn


def calibration_options(fn):
    """The calibration flags shared by `observe`, `prune --method` and `merge`."""
    for option in reversed([
        click.option("--calib", "calib", default=None, help="Calibration SOURCE[:N],... (default: built-in mixed set)."),
        click.option("--max-length", default=None, type=click.IntRange(min=2),
                     help="Tokens per calibration sequence [default: 512, or the model's context if shorter]."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Calibration sequences per forward pass."),
        click.option("--no-pack", is_flag=True, help="One text per sequence (padded) instead of packing."),
        click.option("--chat-template", is_flag=True, help="Apply the tokenizer's chat template."),
        click.option("--text-field", default="text", show_default=True,
                     help="Field holding the text in .jsonl/.json/.csv/.parquet/datasets sources."),
        click.option("--seed", default=0, show_default=True),
    ]):
        fn = option(fn)
    return execution_options(fn)


def recipe_from_cli(model: str, *, method: str = "reap", ratio=None, keep=None, keep_file=None, calib=None,
                    max_length=None, batch_size=8, no_pack=False, chat_template=False, text_field="text", seed=0,
                    dtype="auto", device="auto", execution="auto", max_memory=None, merge=None, protect=True,
                    all_means_tokens=None, recover=None, **_):
    """A recipe from command-line flags: `prune` and `merge` run the same pipeline as `run`."""
    from pydantic import ValidationError

    from moeprune.errors import MoePruneError
    from moeprune.pipeline import Recipe
    from moeprune.pipeline.recipe import format_validation_error

    merge = dict(merge or {})
    if all_means_tokens is not None:
        merge["all_means_tokens"] = all_means_tokens
    try:
        return Recipe.model_validate({
            "model": model, "method": method, "ratio": ratio, "keep": keep, "keep_file": keep_file, "seed": seed,
            "dtype": dtype, "device": device, "execution": execution, "max_memory": max_memory,
            "merge": merge, "protect_super_experts": protect, "recover": recover,
            "calibration": {"spec": calib, "max_length": max_length, "batch_size": batch_size, "pack": not no_pack,
                            "chat_template": chat_template, "text_field": text_field},
        })
    except ValidationError as exc:
        raise MoePruneError(format_validation_error("command line", exc).replace("'keep'", "'--keep-experts'")) from None


def echo_result(report: dict, out) -> None:
    """The one-line summary of a compression: experts, files on disk, execution, where."""
    from moeprune.units import human_bytes

    comp = report["compression"]
    verb = "merged into" if "merged" in comp else "kept"
    click.echo(f"{comp['method']}: {verb} {comp['experts_after']} of {comp['experts_before']} experts per MoE layer; "
               f"files {human_bytes(comp['bytes_before'])} -> {human_bytes(report['sizes']['files_on_disk'])} "
               f"({report['dtype']['output']}, {report['execution']} execution) -> {out}")
    rec = report.get("recovery")
    if rec:
        from moeprune.report.markdown import recovery_line

        click.echo(recovery_line(rec))


def observe_options(fn):
    """The arguments of `observe` (and its `observe-stream` alias)."""
    for option in reversed([
        click.argument("model_dir"),
        click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the observations."),
        click.option("--collect", default="", help="Extra statistics: routed_means,all_means,router_gram,output_cosine."),
        click.option("--all-means-tokens", type=click.IntRange(min=1), default=None,
                     help="Token cap per batch for all_means."),
        click.option("--overwrite", is_flag=True),
    ]):
        fn = option(fn)
    return calibration_options(fn)


@click.command("observe")
@observe_options
def observe_cmd(model_dir, out_dir, collect, all_means_tokens, overwrite, **calib):
    """Run calibration data through MODEL_DIR and save router/expert statistics."""
    observe_to(model_dir, out_dir, collect=collect, all_means_tokens=all_means_tokens, overwrite=overwrite, **calib)


def observe_to(model_dir, out_dir, *, collect: str, all_means_tokens, overwrite: bool, **calib) -> None:
    from moeprune.execution import make_executor
    from moeprune.pipeline.plan import make_plan

    stats = tuple(s for s in collect.split(",") if s)
    recipe = recipe_from_cli(model_dir, method="frequency", ratio=0.5, all_means_tokens=all_means_tokens, **calib)
    plan = make_plan(recipe, out_dir=out_dir, overwrite=overwrite, observe_only=True, collect=stats)
    click.echo(plan.summary())
    ex = make_executor(plan, log=click.echo)
    obs = ex.observe()  # under torchrun: every rank its share, statistics all-reduced
    distributed.leave_unless_main()  # rank 0 alone writes
    obs.meta["used_default_calibration"] = ex.calibration().used_default
    with plan.output as tmp:
        obs.save(tmp)
    click.echo(f"observed {obs.num_tokens} tokens over {len(obs.layers)} MoE layers ({plan.execution}) -> {out_dir}")


@click.command("observe-merge")
@click.argument("folders", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the combined observations.")
@click.option("--overwrite", is_flag=True)
def observe_merge_cmd(folders, out_dir, overwrite):
    """Combine observation FOLDERS of one model (e.g. from several machines) into one, exactly."""
    from moeprune.checkpoint.writer import atomic_output_dir, check_output_dir
    from moeprune.observe import Observations
    from moeprune.observe.combine import combine_observations

    check_output_dir(out_dir, inputs=folders, overwrite=overwrite)
    obs = combine_observations([Observations.load(f) for f in folders], sources=list(folders))
    with atomic_output_dir(out_dir, inputs=folders, overwrite=overwrite) as tmp:
        obs.save(tmp)
    click.echo(f"combined {len(folders)} observation sets: {obs.num_tokens} tokens -> {out_dir}")


@click.command("run")
@click.argument("recipe_file", type=click.Path())
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(), help="Output folder (overrides the recipe).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set ratio=0.25 --set eval.limit=20.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--execution", default=None, type=click.Choice(["auto", "memory", "layerwise"]),
              help="Override the recipe's execution.")
@click.option("--max-memory", default=None, help="Override the recipe's max_memory, e.g. 24GB.")
@click.option("--no-progress", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Print the plan (with the recovery memory table) and stop: no weight "
                                               "is read, nothing is written.")
@click.option("--processes", type=click.IntRange(1, 4096), default=None,
              help="With --dry-run: plan as a torchrun launch of N processes would (memory per process).")
def run_cmd(recipe_file, out_dir, overrides, overwrite, execution, max_memory, no_progress, dry_run, processes):
    """Observe, score, prune, evaluate and write OUT/ as a recipe says."""
    from moeprune.errors import MoePruneError
    from moeprune.pipeline import load_recipe, run_recipe

    overrides = list(overrides)
    if execution is not None:
        overrides.append(f"execution={execution}")
    if max_memory is not None:
        overrides.append(f"max_memory={max_memory}")
    if processes is not None and not dry_run:
        raise MoePruneError("--processes: plans a launch of N processes with --dry-run; to run on N, launch with "
                            "torchrun --nproc-per-node N")
    recipe = load_recipe(recipe_file, overrides)
    if dry_run:
        from moeprune.pipeline.plan import make_plan

        click.echo(make_plan(recipe, needs_output=False, inputs=(recipe_file,), processes=processes).summary())
        return
    report = run_recipe(recipe, out_dir=out_dir, overwrite=overwrite, progress=not no_progress, log=click.echo,
                        inputs=(recipe_file,))
    echo_result(report, out_dir or recipe.output)
    for task, res in report["eval"]["compressed"].items():
        base = report["eval"]["base"].get(task, {}).get("score")
        base_txt = f"{base:.3f} -> " if base is not None else ""
        click.echo(f"  {task:<16} {base_txt}{res['score']:.3f}  (n={res['n']})")
    click.echo(f"wrote {out_dir or recipe.output}")
    if report["eval"]["retained"]:
        click.echo(json.dumps({"retained": report["eval"]["retained"]}))
