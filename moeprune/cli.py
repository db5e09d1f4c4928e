"""The `moeprune` command line."""

from __future__ import annotations

import functools
import sys

import click

from moeprune import __version__
from moeprune.errors import MoePruneError

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Turns `MoePruneError` into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
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
