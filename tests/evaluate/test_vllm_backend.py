"""The vLLM evaluation backend against the Hugging Face one on the demo model.

The engine tests run where vLLM is installed (CI's vLLM stage installs moeprune into vLLM's environment and
runs this file there); elsewhere they are skipped, and only the arithmetic and the refusals are checked.
"""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from moeprune.errors import MoePruneError
from moeprune.evaluate.vllm_backend import prompt_nll, resolve_backend, vllm_available


class _Logprob:
    def __init__(self, value: float):
        self.logprob = value


def test_prompt_nll_sums_the_texts_own_tokens_after_the_first():
    ids = [5, 7, 9]
    plp = [None, {7: _Logprob(-1.5), 3: _Logprob(-0.1)}, {2: _Logprob(-0.2), 9: _Logprob(-0.25)}]
    assert prompt_nll(ids, plp) == (1.75, 2)


def test_prompt_nll_refuses_missing_positions():
    with pytest.raises(MoePruneError, match="position 2"):
        prompt_nll([5, 7, 9], [None, {7: _Logprob(-1.0)}, {2: _Logprob(-0.2)}])


def test_backend_names():
    assert resolve_backend("hf") == "hf"
    with pytest.raises(MoePruneError, match="not a backend"):
        resolve_backend("tgi")
    if not vllm_available():
        assert resolve_backend("auto") == "hf"
        with pytest.raises(MoePruneError, match="vLLM is not installed"):
            resolve_backend("vllm")


def test_cli_refuses_a_bad_backend_and_a_missing_vllm_in_one_line():
    from moeprune.cli import _register_commands, cli

    _register_commands()
    res = CliRunner().invoke(cli, ["eval", "demo", "--tasks", "demo_arith", "--backend", "tgi"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("Error: ")
    if not vllm_available():
        res = CliRunner().invoke(cli, ["eval", "demo", "--tasks", "demo_arith", "--backend", "vllm"])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and "vLLM is not installed" in res.output


def test_recipe_backend_vllm_without_vllm_fails_in_the_plan(tmp_path):
    if vllm_available():
        pytest.skip("vLLM is installed here")
    from moeprune.cli import _register_commands, cli

    _register_commands()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: demo\nmethod: frequency\nratio: 0.5\neval: {tasks: [demo_arith], backend: vllm}\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "eval.backend vllm: vLLM is not installed" in res.output
    assert not (tmp_path / "out").exists()
    recipe.write_text("model: demo\nmethod: frequency\nratio: 0.5\neval: {tasks: [demo_arith], backend: tgi}\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "eval.backend" in res.output and res.output.count("\n") == 1


# ---------------------------------------------------------------------------------------- with vLLM
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed here (CI's vLLM stage runs these)")


@pytest.fixture(scope="module")
def demo():
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer, resolve_model_dir

    path = resolve_model_dir("demo")
    return path, load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)


@pytest.fixture(scope="module")
def engines(demo):
    from moeprune.evaluate import HFBackend
    from moeprune.evaluate.vllm_backend import VLLMBackend

    path, model, tok = demo
    vllm = VLLMBackend(path, tok, dtype="float32", progress=False)
    yield HFBackend(model, tok, progress=False), vllm
    vllm.close()


PROMPTS = ["Q: 12 + 7 =\nA:", "{\"name\": \"ada\", \"age\":", "x = 3\nprint(x * 2)\n# output:",
           "The river", "Q: 3 + 4 =\nA:"]


@needs_vllm
def test_greedy_generation_matches_transformers_and_keeps_input_order(engines):
    hf, vllm = engines
    a = hf.generate(PROMPTS, max_new_tokens=12)
    b = vllm.generate(PROMPTS, max_new_tokens=12)
    assert len(b) == len(PROMPTS)
    assert sum(x == y for x, y in zip(a, b)) >= len(PROMPTS) - 1, (a, b)
    assert vllm.generate(PROMPTS[::-1], max_new_tokens=12) == b[::-1]  # order follows the input


@needs_vllm
def test_stop_strings_cut_the_completion_before_the_stop(engines):
    hf, vllm = engines
    full = vllm.generate(PROMPTS, max_new_tokens=16)
    cut = vllm.generate(PROMPTS, max_new_tokens=16, stop=["\n"])
    for f, c in zip(full, cut):
        assert "\n" not in c and f.startswith(c)
        assert c == f.split("\n")[0]
    assert hf.generate(PROMPTS, max_new_tokens=16, stop=["\n"]) == cut or \
        sum(x == y for x, y in zip(hf.generate(PROMPTS, max_new_tokens=16, stop=["\n"]), cut)) >= 4


@needs_vllm
def test_perplexity_arithmetic_matches_transformers(engines):
    hf, vllm = engines
    texts = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1\n", "a"]
    for (n1, t1), (n2, t2) in zip(hf.token_nll(texts), vllm.token_nll(texts)):
        assert t1 == t2
        if t1:
            assert math.isclose(n1 / t1, n2 / t2, rel_tol=1e-3), (n1, n2)
        else:
            assert n1 == n2 == 0.0


def test_recover_generate_engine_resolves_in_the_plan(tmp_path):
    """recover.generate.engine: hf always; auto is vLLM only where it is installed; vllm without it is one line."""
    from moeprune.cli import _register_commands, cli
    from moeprune.pipeline.plan import make_plan
    from moeprune.pipeline.recipe import Recipe

    _register_commands()
    base = {"model": "demo", "method": "frequency", "ratio": 0.5,
            "recover": {"method": "moe_kd", "generate": {"samples": 1}}}
    for engine in ("hf", "auto"):
        data = {**base, "recover": {**base["recover"], "generate": {"samples": 1, "engine": engine}}}
        plan = make_plan(Recipe.model_validate(data), out_dir=tmp_path / f"o-{engine}")
        want = "vllm" if engine == "auto" and resolve_backend("auto", plan.device.type) == "vllm" else "hf"
        assert plan.generate_engine == want
    assert make_plan(Recipe.model_validate({**base, "recover": {"method": "moe_kd"}}),
                     out_dir=tmp_path / "none").generate_engine is None
    if not vllm_available():
        recipe = tmp_path / "r.yaml"
        recipe.write_text("model: demo\nmethod: frequency\nratio: 0.5\n"
                          "recover: {method: moe_kd, generate: {samples: 1, engine: vllm}}\n")
        res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and res.output.count("\n") == 1
        assert "recover.generate.engine vllm: vLLM is not installed" in res.output
        assert not (tmp_path / "out").exists()


@needs_vllm
def test_engine_samples_the_teachers_text_reproducibly(engines, demo):
    """vLLM writes recover.generate's text: rows start with their prompt, end at the first end-of-sequence token
    or after max_new_tokens, the same seeds give the same rows, other seeds other rows; the record says vLLM."""
    import torch

    from moeprune.pipeline.recipe import GenerateConfig
    from moeprune.recover.generate import _eos_ids, teacher_rows

    _, vllm = engines
    path, model, tok = demo
    eos = sorted(_eos_ids(model, tok))
    prompts = [tok(p)["input_ids"][:4] for p in PROMPTS]
    a = vllm.sample(prompts, max_new_tokens=12, temperature=1.0, seeds=range(5), eos_ids=eos)
    assert a == vllm.sample(prompts, max_new_tokens=12, temperature=1.0, seeds=range(5), eos_ids=eos)
    assert a != vllm.sample(prompts, max_new_tokens=12, temperature=1.0, seeds=range(5, 10), eos_ids=eos)
    for p, row in zip(prompts, a):
        assert row[:4] == p and 4 < len(row) <= 16
        ends = [k for k, t in enumerate(row[4:]) if t in eos]
        assert not ends or ends[0] == len(row) - 5  # nothing after the first end-of-sequence token
    batch = {"input_ids": torch.tensor(prompts), "attention_mask": torch.ones(len(prompts), 4, dtype=torch.long)}
    cfg = GenerateConfig(samples=2, prompt_tokens=4, max_new_tokens=8)
    rows, record = teacher_rows(model, tok, [batch], cfg, max_length=12, budget=10_000, seed=3, engine=vllm)
    assert record["engine"] == "vllm" and record["rows"] == len(rows) == 10 and record["prompts"] == 5
