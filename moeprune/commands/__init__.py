"""CLI commands, one module per area; importing a module registers its commands on `moeprune.cli.cli`."""

from moeprune.commands import surgery  # noqa: F401
from moeprune.commands import eval_cmd  # noqa: F401
from moeprune.commands import pipeline_cmds  # noqa: F401
from moeprune.commands import quantize_cmd  # noqa: F401
from moeprune.commands import publish_cmd  # noqa: F401
from moeprune.commands import stream_cmd  # noqa: F401
