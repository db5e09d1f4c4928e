"""`moeprune prune-stream` and `moeprune observe-stream`: the out-of-core paths for checkpoints larger than RAM."""

from __future__ import annotations

from pathlib import Path

import click

from moeprune.cli import cli
from moeprune.commands.pipeline_cmds import calibration_options, load_cli_calibration

__all__ = ["prune_stream_cmd", "observe_stream_cmd"]


@cli.command("prune-stream")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--keep", "keep_file", required=True, type=click.Path(),
              help="KEEP.json: {\"<layer>\": [kept expert indices]}.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 2GiB.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def prune_stream_cmd(model_dir: str, out_dir: str, keep_file: str, max_shard_size: str, overwrite: bool) -> None:
    """Remove experts from MODEL_DIR by rewriting its safetensors files shard by shard (never loads the model)."""
    from moeprune.compress import load_keep_file
    from moeprune.stream import prune_checkpoint

    plan = load_keep_file(keep_file)
    res = prune_checkpoint(model_dir, out_dir, plan, overwrite=overwrite, max_shard_size=max_shard_size,
                           where=str(keep_file), provenance={"method": "keep-file", "keep_file": str(keep_file)})
    click.echo(f"kept {len(next(iter(res.kept.values())))} experts in each of {len(res.kept)} MoE layers: "
               f"{res.bytes_before / 1e9:.3f} GB -> {res.bytes_after / 1e9:.3f} GB in {res.shards} shard(s), "
               f"{res.seconds:.1f}s -> {res.out_dir}")


@cli.command("observe-stream")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the observations.")
@click.option("--collect", default="", help="Extra statistics: routed_means,all_means,router_gram.")
@click.option("--all-means-tokens", type=click.IntRange(min=1), default=None, help="Token cap per batch for all_means.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when available).")
@click.option("--max-ram-gb", type=float, default=None, help="Spill hidden states to disk beyond this many GB.")
@click.option("--overwrite", is_flag=True)
@calibration_options
def observe_stream_cmd(model_dir, out_dir, collect, all_means_tokens, device, max_ram_gb, overwrite, **calib):
    """Observe MODEL_DIR one decoder layer at a time (for models larger than memory); same output as `observe`."""
    from moeprune.errors import MoePruneError
    from moeprune.io import atomic_output_dir, check_output_dir, load_tokenizer, resolve_model_dir
    from moeprune.stream import observe_layerwise

    src = resolve_model_dir(model_dir)
    check_output_dir(out_dir, inputs=(src,), overwrite=overwrite)
    if calib["dtype"] == "auto":
        raise MoePruneError("observe-stream needs an explicit --dtype (float32, bfloat16 or float16)")
    data = load_cli_calibration(calib, load_tokenizer(src))
    budget = None if max_ram_gb is None else int(max_ram_gb * 1e9)
    obs = observe_layerwise(src, data, collect=tuple(s for s in collect.split(",") if s),
                            all_means_tokens=all_means_tokens, device=device, dtype=calib["dtype"],
                            max_ram_bytes=budget)
    with atomic_output_dir(out_dir, inputs=(src,), overwrite=overwrite) as tmp:
        obs.save(tmp)
    click.echo(f"observed {obs.num_tokens} tokens over {len(obs.layers)} MoE layers layer by layer "
               f"({obs.meta['device']}) -> {Path(out_dir).resolve()}")
