"""Two processes under torchrun (gloo, CPU) observe exactly what one process observes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeprune.observe import Observations
from moeprune.testing import save_tiny

WORKER = Path(__file__).with_name("observe_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _launch(args, tmp_path, nproc: int | None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    done = subprocess.run([*launcher, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_observations(a: Observations, b: Observations) -> None:
    assert a.num_tokens == b.num_tokens > 0
    assert sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        ta, tb = a.layers[i].tensors(), b.layers[i].tensors()
        assert sorted(ta) == sorted(tb)
        for name in ta:
            torch.testing.assert_close(ta[name], tb[name], rtol=1e-6, atol=1e-9, msg=f"layer {i} {name}")


@pytest.mark.slow  # the CLI test below covers both executors in the default suite
def test_two_ranks_observe_what_one_process_observes(tmp_path):
    """Both observers called directly, every optional statistic, ranks with unequal shares (5 batches)."""
    model_dir = save_tiny(tmp_path / "tiny", "qwen2_moe")
    _launch([WORKER, model_dir, tmp_path / "one"], tmp_path, None)
    _launch([WORKER, model_dir, tmp_path / "two"], tmp_path, 2)
    for mode in ("memory", "layerwise"):
        one, two = Observations.load(tmp_path / "one" / mode), Observations.load(tmp_path / "two" / mode)
        assert "distributed" not in one.meta
        assert two.meta["distributed"]["world_size"] == 2
        assert_same_observations(one, two)
    # rank 1 wrote nothing: only rank 0's two folders exist
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["layerwise", "memory"]


CLI_WORKER = Path(__file__).with_name("cli_worker.py")


def _commands(model_dir, calib, out, cache):
    """observe (memory), prune --method reap (memory, layerwise: its observations are its cache entry)."""
    calib_args = ["--calib", str(calib), "--max-length", "24", "--batch-size", "3", "--dtype", "float32"]
    return [[str(cache / "observe"), "observe", str(model_dir), "-o", str(out / "obs-memory"),
             "--collect", "routed_means,router_gram", "--execution", "memory", *calib_args],
            *[[str(cache / f"prune-{ex}"), "prune", str(model_dir), "-o", str(out / f"prune-{ex}"),
               "--method", "reap", "--ratio", "0.5", "--execution", ex, *calib_args] for ex in ("memory", "layerwise")]]


def run_in_one_process(commands) -> None:
    """Each [cache folder, *CLI arguments] of `commands` through the CLI in this process, on one thread as each
    rank runs (on some CPUs a product's last bits depend on the thread count)."""
    from click.testing import CliRunner

    from moeprune.cli import _register_commands, cli

    _register_commands()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cache, *args in commands:
            result = CliRunner(env={"MOEPRUNE_CACHE": cache}).invoke(cli, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)


def _cached(cache):
    (entry,) = (cache / "observations").iterdir()  # rank 0 alone caches: one entry
    return Observations.load(entry)


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path):
    import json

    model_dir = save_tiny(tmp_path / "tiny", "mixtral")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i} plus {i} makes {2 * i}; the cat sat on mat {i}." for i in range(30)))
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_one_process(_commands(model_dir, calib, one, tmp_path / "cache1"))
    spec = tmp_path / "commands.json"
    spec.write_text(json.dumps(_commands(model_dir, calib, two, tmp_path / "cache2")))
    _launch([CLI_WORKER, spec], tmp_path, 2)
    pairs = {"observe, memory": (one / "obs-memory", two / "obs-memory")}
    for ex in ("memory", "layerwise"):
        pairs[f"prune, {ex}"] = (_cached(tmp_path / "cache1" / f"prune-{ex}"), _cached(tmp_path / "cache2" / f"prune-{ex}"))
        keep = [json.loads((d / f"prune-{ex}" / "moeprune.json").read_text())["kept"] for d in (one, two)]
        assert keep[0] == keep[1], ex
    for what, (a, b) in pairs.items():
        a, b = (x if isinstance(x, Observations) else Observations.load(x) for x in (a, b))
        assert "distributed" not in a.meta and b.meta["distributed"]["world_size"] == 2, what
        assert_same_observations(a, b)
    assert _cached(tmp_path / "cache2" / "prune-layerwise").meta.get("layerwise") is True
    # nothing but the outputs (no temporary folders of another rank)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
