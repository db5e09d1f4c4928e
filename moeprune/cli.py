"""The `moeprune` command line."""

from __future__ import annotations

import functools
import os
import sys

import click

from moeprune import __version__
from moeprune.errors import MoePruneError

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Turns `MoePruneError` into a one-line message and exit code 2."""

    def invoke(self, ctx):
        from moeprune import distributed

        try:
            if distributed.launched():  # under torchrun: join the group; only rank 0 prints
                ctx.call_on_close(distributed.finish)
                if not distributed.context().is_main:
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
            return super().invoke(ctx)
        except distributed.RankDone:
            sys.exit(0)
        except MoePruneError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="moeprune")
def cli() -> None:
    """Observe, score, prune, merge and quantize the experts of MoE language models."""


def _register_commands() -> None:
    # Each sub-package adds its commands here; imported lazily so `moeprune --help` stays fast.
    from moeprune import commands  # noqa: F401


def main() -> None:
    _register_commands()
    cli()
