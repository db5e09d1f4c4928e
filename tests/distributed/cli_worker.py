"""Run several `moeprune` commands in one process, as `torchrun ... -m moeprune CMD` would run each.

usage: torchrun --standalone --nproc-per-node N cli_worker.py COMMANDS.json
COMMANDS.json: [[cache_dir, arg, arg, ...], ...]. The process group is joined once and left at the end
(one launch instead of one per command keeps the test short)."""

import json
import os
import sys

from moeprune import distributed
from moeprune.cli import _register_commands, cli


def main(path: str) -> int:
    _register_commands()
    finish, distributed.finish = distributed.finish, lambda **_: None
    for cache, *args in json.loads(open(path).read()):
        os.environ["MOEPRUNE_CACHE"] = cache
        try:
            cli.main(args, prog_name="moeprune", standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                return int(exc.code)
    finish(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
