"""Two processes under torchrun (gloo, CPU) observe exactly what one process observes."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from moeprune.observe import Observations
from tiny_models import save_tiny

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


def test_two_ranks_observe_what_one_process_observes(tmp_path):
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
