"""`moeprune observe` and `moeprune run`; method-driven pruning lives in `prune` (surgery.py)."""

from __future__ import annotations

import json

import click

from moeprune.cli import cli

__all__ = ["observe_cmd", "run_cmd", "calibration_options", "load_cli_calibration", "recipe_from_cli"]


def calibration_options(fn):
    """The calibration flags shared by `observe` and `prune --method`."""
    for option in reversed([
        click.option("--calib", "calib", default=None, help="Calibration SOURCE[:N],... (default: built-in mixed set)."),
        click.option("--max-length", default=512, show_default=True, help="Tokens per calibration sequence."),
        click.option("--batch-size", default=8, show_default=True, help="Calibration sequences per forward pass."),
        click.option("--no-pack", is_flag=True, help="One text per sequence (padded) instead of packing."),
        click.option("--chat-template", is_flag=True, help="Apply the tokenizer's chat template."),
        click.option("--text-field", default="text", show_default=True,
                     help="Field holding the text in .jsonl/.json/.csv/.parquet/datasets sources."),
        click.option("--seed", default=0, show_default=True),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "bfloat16", "float16", "auto"])),
    ]):
        fn = option(fn)
    return fn


def load_cli_calibration(calib: dict, tokenizer):
    """The calibration set described by the `calibration_options` flags; says so when it is the default."""
    from moeprune.observe.calibration import load_calibration, parse_calibration_spec

    spec = parse_calibration_spec(calib["calib"], max_length=calib["max_length"], pack=not calib["no_pack"],
                                  seed=calib["seed"], chat_template=calib["chat_template"],
                                  text_field=calib.get("text_field") or "text")
    data = load_calibration(spec, tokenizer, batch_size=calib["batch_size"])
    if data.used_default:
        click.echo("no calibration data given: using the built-in mixed calibration set (demo corpus calib split)")
    return data


def recipe_from_cli(model: str, *, method: str = "reap", ratio=None, keep=None, calib=None, max_length=512,
                    batch_size=8, no_pack=False, chat_template=False, text_field="text", seed=0, dtype="float32",
                    merge=None, protect=True, **_):
    from pydantic import ValidationError

    from moeprune.errors import MoePruneError
    from moeprune.pipeline import Recipe
    from moeprune.pipeline.recipe import format_validation_error

    try:
        return Recipe.model_validate({
            "model": model, "method": method, "ratio": ratio, "keep": keep, "seed": seed, "dtype": dtype,
            "merge": merge or {}, "protect_super_experts": protect,
            "calibration": {"spec": calib, "max_length": max_length, "batch_size": batch_size, "pack": not no_pack,
                            "chat_template": chat_template, "text_field": text_field},
        })
    except ValidationError as exc:
        raise MoePruneError(format_validation_error("command line", exc).replace("'keep'", "'--keep-experts'")) from None


@cli.command("observe")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the observations.")
@click.option("--collect", default="", help="Extra statistics: routed_means,all_means,router_gram.")
@click.option("--all-means-tokens", type=click.IntRange(min=1), default=None, help="Token cap per batch for all_means.")
@click.option("--overwrite", is_flag=True)
@calibration_options
def observe_cmd(model_dir, out_dir, collect, all_means_tokens, overwrite, **calib):
    """Run calibration data through MODEL_DIR and save router/expert statistics."""
    from moeprune.io import atomic_output_dir, check_output_dir, load_model, load_tokenizer, resolve_model_dir
    from moeprune.observe import observe

    src = resolve_model_dir(model_dir)
    check_output_dir(out_dir, inputs=(src,), overwrite=overwrite)
    model = load_model(src, dtype=calib["dtype"])
    data = load_cli_calibration(calib, load_tokenizer(src))
    stats = tuple(s for s in collect.split(",") if s)
    obs = observe(model, data, collect=stats, all_means_tokens=all_means_tokens)
    with atomic_output_dir(out_dir, inputs=(src,), overwrite=overwrite) as tmp:
        obs.save(tmp)
    click.echo(f"observed {obs.num_tokens} tokens over {len(obs.layers)} MoE layers -> {out_dir}")


@cli.command("run")
@click.argument("recipe_file", type=click.Path())
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(), help="Output folder (overrides the recipe).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set ratio=0.25 --set eval.limit=20.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--no-progress", is_flag=True)
def run_cmd(recipe_file, out_dir, overrides, overwrite, no_progress):
    """Observe, score, prune, evaluate and write OUT/ as a recipe says."""
    from moeprune.pipeline import load_recipe, run_recipe

    recipe = load_recipe(recipe_file, list(overrides))
    report = run_recipe(recipe, out_dir=out_dir, overwrite=overwrite, progress=not no_progress, log=click.echo)
    comp = report["compression"]
    click.echo(f"{comp['method']}: {comp['experts_before']} -> {comp['experts_after']} experts per layer, "
               f"{comp['bytes_before'] / 1e6:.1f} MB -> {comp['bytes_after'] / 1e6:.1f} MB")
    for task, res in report["eval"]["compressed"].items():
        base = report["eval"]["base"].get(task, {}).get("score")
        base_txt = f"{base:.3f} -> " if base is not None else ""
        click.echo(f"  {task:<16} {base_txt}{res['score']:.3f}  (n={res['n']})")
    click.echo(f"wrote {out_dir or recipe.output}")
    if report["eval"]["retained"]:
        click.echo(json.dumps({"retained": report["eval"]["retained"]}))
