"""`prune-stream` and `observe-stream`: the names of the out-of-core commands before the one pipeline;
now aliases of `prune --keep ... --execution layerwise` and `observe --execution layerwise`."""

from __future__ import annotations

import click

from moeprune.commands.pipeline_cmds import observe_options

__all__ = ["prune_stream_cmd", "observe_stream_cmd"]


@click.command("prune-stream", hidden=True)
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (must be new or empty).")
@click.option("--keep", "keep_file", required=True, type=click.Path(),
              help="KEEP.json: {\"<layer>\": [kept expert indices]}.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 2GiB.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def prune_stream_cmd(model_dir: str, out_dir: str, keep_file: str, max_shard_size: str, overwrite: bool) -> None:
    """Alias of `moeprune prune MODEL_DIR --keep KEEP.json --execution layerwise`."""
    from moeprune.commands.surgery import _compress

    _compress(model_dir, out_dir, method="keep_file", keep_file=keep_file, overwrite=overwrite,
              max_shard_size=max_shard_size, execution="layerwise")


@click.command("observe-stream", hidden=True)
@observe_options
def observe_stream_cmd(model_dir, out_dir, collect, all_means_tokens, overwrite, **calib):
    """Alias of `moeprune observe MODEL_DIR --execution layerwise`."""
    from moeprune.commands.pipeline_cmds import observe_to

    calib["execution"] = "layerwise"
    observe_to(model_dir, out_dir, collect=collect, all_means_tokens=all_means_tokens, overwrite=overwrite, **calib)
