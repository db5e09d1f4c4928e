"""`moeprune run` with `quantize: {method: gptq}`: the compressed model is GPTQ-quantized on the run's
calibration batches; a GPTQ mixed budget is refused at validation."""

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from moeprune.cli import cli
from moeprune.commands import pipeline_cmds, surgery  # noqa: F401
from moeprune.testing import save_tiny

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq_run")
    model = save_tiny(root / "tiny", "qwen3_moe")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(f"{i} + {i * 3} = {i * 4}. The cat sat on mat number {i}." for i in range(40)))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {model}\nmethod: frequency\nratio: 0.5\n"
                      f"calibration: {{spec: '{calib}', max_length: 32, batch_size: 4}}\n")
    return root, model, recipe


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_run_quantizes_with_gptq(setup, tmp_path, monkeypatch):
    root, model, recipe = setup
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gptq"
    result = _invoke("run", recipe, "-o", out, "--no-progress", "--set", "quantize.bits=4",
                     "--set", "quantize.group_size=32", "--set", "quantize.method=gptq", "--set", "quantize.damp=0.05")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    record = json.loads((out / "moeprune.json").read_text())["quantization"]
    assert report["quantization"]["method"] == record["method"] == "gptq"
    details = record["method_details"]  # written by the GPTQ pass only: per decoder layer, the experts solved
    assert details["options"]["damp"] == 0.05 and set(details["layers"]) == {"0", "1"}
    kept = 4  # ratio 0.5 of 8 experts: the GPTQ pass saw the compressed model
    assert all(r["gptq_experts"] + len(r["rtn_experts"]) == kept for r in details["layers"].values())
    assert any(k.endswith("experts.0.down_proj.weight_packed") for f in out.glob("*.safetensors")
               for k in load_file(f))


def test_gptq_with_mixed_budget_is_refused(setup, tmp_path):
    root, model, recipe = setup
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "o"), "--no-progress", "--set",
                                      "quantize.method=gptq", "--set", "quantize.bits=8", "--set",
                                      "quantize.mixed_budget=12"])
    assert result.exit_code == 2 and "method gptq applies to uniform quantization" in result.output, result.output
    assert not (tmp_path / "o").exists()
