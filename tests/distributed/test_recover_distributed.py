"""Logit-KD recovery under torchrun trains on both processes (each step's rows split over the ranks, gradients
summed; data-parallel: Adam moments sharded; sharded: FSDP2 shards the MoE blocks' parameters, gradients and
moments) and writes what one process writes, within float32 reduction-order noise."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune.testing import save_tiny
from tests.distributed.test_observe_distributed import CLI_WORKER, _launch, run_in_one_process


def _commands(model_dir, calib, out, cache, generate: bool, parallel: str = "auto"):
    args = ["--calib", str(calib), "--max-length", "16", "--batch-size", "3", "--no-pack", "--dtype", "float32",
            "--method", "frequency", "--ratio", "0.5", "--recover", "moe_kd", "--recover-steps", "6",
            "--recover-parallel", parallel]
    if generate:
        args += ["--recover-generate", "2", "--recover-tokens", "400"]
    return [[str(cache), "prune", str(model_dir), "-o", str(out), *args]]


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("generate,parallel", [(False, "data"), (True, "data"), (False, "sharded")])
def test_two_ranks_train_what_one_process_trains(tmp_path, generate, parallel):
    model_dir = save_tiny(tmp_path / "tiny", "qwen2_moe")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i} plus {i} makes {2 * i}; the cat sat on mat {i}." for i in range(20)))
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_one_process(_commands(model_dir, calib, one, tmp_path / "cache1", generate))
    spec = tmp_path / "commands.json"
    spec.write_text(json.dumps(_commands(model_dir, calib, two, tmp_path / "cache2", generate, parallel)))
    done = _launch([CLI_WORKER, spec], tmp_path, 2)
    assert "returned a view tensor" not in done.stderr  # sharded: no block output FSDP2 could lose its hook on

    rec1 = json.loads((one / "moeprune.json").read_text())["recovery"]
    rec2 = json.loads((two / "moeprune.json").read_text())["recovery"]
    assert rec1["parallel"]["processes"] == 1 and rec2["parallel"]["processes"] == 2
    state1, state2 = rec1["parallel"]["state_bytes_per_process"], rec2["parallel"]["state_bytes_per_process"]
    assert rec2["parallel"]["mode"] == parallel
    assert len(state2) == 2 and max(state2) < state1[0]  # Adam's moments are sharded over the two ranks
    if parallel == "data":
        # masters + their float32 gradients + the model-dtype gradients stay whole: 12 B of the 20 B per parameter
        assert min(state2) >= 12 * rec2["trained_params"]
    else:  # parameters, gradients and moments (16 B) split: each rank about half (uneven shards), all of it together
        assert max(state2) <= 0.55 * state1[0] and sum(state2) >= 16 * rec2["trained_params"]
    assert rec1["train_tokens"] == rec2["train_tokens"]
    if generate:
        assert rec1["generated"]["tokens"] == rec2["generated"]["tokens"] > 0
    # the tiny random model's KL is ~1e-5, so float32 rounding of the split rows shows in the third digit
    noise = 1e-2 * rec1["kl_before"]
    assert rec2["kl_before"] == pytest.approx(rec1["kl_before"], abs=noise)
    assert rec2["loss_first"] == pytest.approx(rec1["loss_first"], abs=noise)
    assert rec2["kl_after"] == pytest.approx(rec1["kl_after"], abs=noise)
    assert rec1["kl_after"] < 0.9 * rec1["kl_before"] and rec2["kl_after"] < 0.9 * rec2["kl_before"]
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    changed = 0
    source = _tensors(model_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
        if name in source and source[name].shape == a[name].shape and not torch.equal(source[name], a[name]):
            changed += 1
    assert changed > 0  # recovery trained something, on both sides
