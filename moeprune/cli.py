"""The `moeprune` command line."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from moeprune import __version__
from moeprune.errors import MoePruneError

__all__ = ["main", "cli"]


def _error(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Bad input (a `MoePruneError` or a click usage error) -> one line `Error: ...`, exit code 2.

    Anything else is a bug: Python prints the traceback and exits with 1.
    """

    _loaded = False

    def get_command(self, ctx, name):
        _register_commands()
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        _register_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx):
        from moeprune import distributed

        launched, clean = distributed.launched(), False
        try:
            if launched:  # under torchrun: join the group; only rank 0 prints
                if not distributed.context().is_main:
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
            result = super().invoke(ctx)
            clean = True
            return result
        except distributed.RankDone:  # this rank's part is over; rank 0 goes on
            clean = True
            sys.exit(0)
        except MoePruneError as exc:
            _error(str(exc))
        finally:
            if launched:  # leave together after a clean end, at once after an error
                distributed.finish(wait=clean)

    def main(self, *args, **kwargs):
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as exc:  # usage errors, bad option values, missing files
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `moeprune` or `moeprune CMD`: the help
                exc.show()
                sys.exit(exc.exit_code)
            _error(exc.format_message())
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _DropNoise(logging.Filter):
    """Drops the import-time messages of torchao (binaries built for another Python or GPU) and of
    torch about torchao's enums; transformers imports torchao whenever it is installed."""

    _NOISE = ("Failed to load ", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(part in message for part in self._NOISE)


def _quiet_import_noise() -> None:
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_DropNoise())


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="moeprune")
def cli() -> None:
    """Observe, score, prune, merge and quantize the experts of MoE language models."""


def _register_commands() -> None:
    """Add the commands of `moeprune.commands` to the group (once; on first use, so importing this module stays
    fast). The commands do not import this module: the arrow runs from the CLI down to them only."""
    if _Group._loaded:
        return
    _Group._loaded = True
    from moeprune.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


# oneDNN (torch's CPU matmul library) keeps every compiled matmul kernel in a cache of 1024 entries by default.
# The expert matmuls of an MoE layer see a different number of rows per expert on every call, so each layer
# of a forward adds one-off kernels (about 1 MB each on an AVX-512/AMX CPU): 20+ MB per decoder layer that
# is never given back, the largest part of the memory growth of a layer-by-layer evaluation. 64 entries
# keep the kernels that repeat (attention projections, the small shapes of token-by-token generation) at a
# bounded cost. oneDNN reads the variable when it creates its first kernel, so it is set before any
# command runs; a value the user exported is kept. See docs/scale.md.
ONEDNN_CACHE_CAPACITY = "64"


def _bound_onednn_cache() -> None:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def _on_termination(signum, _frame) -> None:
    """SIGTERM / SIGHUP (what `timeout`, Slurm, Kubernetes and a closed terminal send) unwind like Ctrl-C: every
    open output folder removes its temporary folder on the way out; the exit status is 128 + the signal."""
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    click.echo(f"Terminated ({signal.Signals(signum).name}); temporary files removed", err=True)
    raise SystemExit(128 + signum)


def _handle_termination() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_termination)


def main() -> None:
    _handle_termination()
    _bound_onednn_cache()
    _quiet_import_noise()
    _register_commands()
    cli()
