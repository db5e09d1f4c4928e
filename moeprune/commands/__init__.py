"""The CLI: thin click commands that build a recipe and call the pipeline; `moeprune.cli` adds COMMANDS."""

import click

from moeprune.commands import eval_cmd, pipeline_cmds, publish_cmd, quantize_cmd, stream_cmd, surgery

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [obj for module in (surgery, eval_cmd, pipeline_cmds, quantize_cmd, publish_cmd, stream_cmd)
                                 for obj in vars(module).values() if isinstance(obj, click.Command)]
