"""scripts/check_vllm.py without vLLM: the agreement measure, the dtype rule, a missing vLLM environment."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_vllm", ROOT / "scripts" / "check_vllm.py")
check_vllm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_vllm)


def test_agreement_counts_the_common_prefix_only():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    got = [[1, 2, 3, 4], [5, 0, 7, 8], [0, 9, 9, 9]]  # a match after the first divergence does not count
    assert check_vllm.agreement(ref, got, tokens=4) == [4, 1, 0]
    assert check_vllm.agreement([[1, 2]], [[1, 2, 3]], tokens=4) == [2]


def test_dtype_auto_is_float32_unless_quantized(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    assert check_vllm.resolve_dtype(tmp_path, "auto") == "float32"
    assert check_vllm.resolve_dtype(tmp_path, "float16") == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    assert check_vllm.resolve_dtype(tmp_path, "auto") == "bfloat16"


def test_missing_vllm_environment_is_a_one_line_error(tmp_path, capsys):
    demo = ROOT / "moeprune" / "assets" / "demo-moe"
    rc = check_vllm.main([str(demo), "--vllm-python", str(tmp_path / "nope" / "python")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("Error: no vLLM environment at") and err.count("\n") == 1


def test_per_token_agreement_counts_each_position():
    # argmax[i][j]: the reference's choice after prompt i and candidate[i][:j]; a flip costs one token only
    argmax = [[1, 2, 3, 4], [5, 0, 7, 8], [9, 9, 9, 9]]
    got = [[1, 2, 3, 4], [5, 6, 7, 8], [0, 9, 9, 9]]
    assert check_vllm.per_token_agreement(argmax, got, tokens=4) == [4, 3, 3]
    assert check_vllm.per_token_agreement([[1, 2, 3]], [[1, 2, 0]], tokens=2) == [2]
    assert check_vllm.agreement(argmax, got, tokens=4) == [4, 1, 0]  # the prefix measure on the same lists


def test_measure_auto_is_prefix_in_float32_only():
    assert check_vllm.resolve_measure("auto", "float32") == "prefix"
    assert check_vllm.resolve_measure("auto", "bfloat16") == "per-token"
    assert check_vllm.resolve_measure("prefix", "bfloat16") == "prefix"


def test_argmax_along_is_teacher_forced_greedy():
    # on vLLM's own continuation, transformers' teacher-forced argmax equals its greedy tokens when they agree
    import torch
    from transformers import AutoModelForCausalLM

    from moeprune.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).eval()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = check_vllm.transformers_tokens(model, prompts, tokens=5)
    assert check_vllm.transformers_argmax_along(model, prompts, greedy) == greedy
    shifted = [[(t + 1) % model.config.vocab_size for t in g] for g in greedy]  # a different continuation
    along = check_vllm.transformers_argmax_along(model, prompts, shifted)
    assert [a[0] for a in along] == [g[0] for g in greedy]  # position 0 sees only the prompt
