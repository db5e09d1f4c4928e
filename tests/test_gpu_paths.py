"""The GPU paths of recovery and quantization on a CUDA device (marked `gpu`; skipped where there is none).

Run on a machine with CUDA: `python -m pytest -q -m gpu tests/test_gpu_paths.py`. The same code runs on CPU in
the default suite; these check that nothing in it assumes the CPU (device placement of masters, targets,
Hessians, hidden states, generated text)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from moeprune.testing import save_tiny
from recover.common import calib_file

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return calib_file(tmp_path_factory.mktemp("calib") / "calib.txt")


def _run(model, calib, out, **kw):
    recipe = Recipe.model_validate({"model": str(model), "method": "reap", "ratio": 0.5, "device": "cuda",
                                    "calibration": {"spec": str(calib), "max_length": 32, "batch_size": 4,
                                                    "pack": False}, **kw})
    return run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("recover", [{"method": "router_kd", "steps": 20},
                                     {"method": "moe_kd", "steps": 20, "generate": {"samples": 1}, "tokens": 2000}])
def test_logit_kd_on_cuda_lowers_the_kl_and_writes_the_source_dtype(tmp_path, monkeypatch, calib, recover):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", "qwen2_moe")
    report = _run(model, calib, tmp_path / "out", recover=recover, dtype="bfloat16")
    rec = report["recovery"]
    assert rec["kl_after"] < rec["kl_before"]
    source = _tensors(model)
    for name, t in _tensors(tmp_path / "out").items():
        assert t.dtype == source[next(iter(source))].dtype, name  # written in the source dtype


def test_gptq_recipe_on_cuda_in_both_executors(tmp_path, monkeypatch, calib):
    """GPU kernels need not be bitwise reproducible, so the two executors' quantized weights are compared as the
    packed checkpoints decode (within one quantization step), not byte for byte as on CPU."""
    from moeprune.compress.quantize import dequantized_tensors

    pytest.importorskip("compressed_tensors")
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "m", "qwen2_moe")
    outs = {}
    for execution in ("memory", "layerwise"):
        outs[execution] = tmp_path / execution
        _run(model, calib, outs[execution], execution=execution, recover={"method": "moe_kd_block", "steps": 3},
             quantize={"method": "gptq", "bits": 4, "group_size": 16, "min_expert_tokens": 4})
    a, b = dequantized_tensors(outs["memory"]), dequantized_tensors(outs["layerwise"])
    assert a.keys() == b.keys()
    record = json.loads((outs["memory"] / "moeprune.json").read_text())["quantization"]
    assert record["method"] == "gptq"
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert float(diff.mean()) < 1e-2 * float(a[name].float().abs().mean() + 1e-6), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("parallel", ["data", "sharded"])
def test_torchrun_recovery_on_two_gpus_matches_one(tmp_path, calib, parallel):
    """moe_kd under `torchrun --nproc-per-node 2` on two GPUs (nccl), data-parallel and FSDP2-sharded, against one
    process on one GPU: the same KL after training to 2% (bf16 kernels differ by rank count) and per-rank state
    below one process's."""
    from tests.distributed.test_observe_distributed import CLI_WORKER, _launch

    model = save_tiny(tmp_path / "m", "qwen2_moe")

    def args(out, cache, mode):
        return [str(cache), "prune", str(model), "-o", str(out), "--calib", str(calib), "--max-length", "16",
                "--batch-size", "4", "--no-pack", "--dtype", "float32", "--device", "cuda", "--method", "frequency",
                "--ratio", "0.5", "--recover", "moe_kd", "--recover-steps", "6", "--recover-parallel", mode]

    for n, out in ((None, tmp_path / "one"), (2, tmp_path / "two")):
        spec = tmp_path / f"spec-{n}.json"
        spec.write_text(json.dumps([args(out, tmp_path / f"cache-{n}", parallel if n else "auto")]))
        _launch([CLI_WORKER, spec], tmp_path, n)
    one = json.loads((tmp_path / "one" / "moeprune.json").read_text())["recovery"]
    two = json.loads((tmp_path / "two" / "moeprune.json").read_text())["recovery"]
    assert two["parallel"]["processes"] == 2 and two["parallel"]["mode"] == parallel
    assert max(two["parallel"]["state_bytes_per_process"]) < one["parallel"]["state_bytes_per_process"][0]
    assert two["kl_after"] == pytest.approx(one["kl_after"], rel=2e-2)
