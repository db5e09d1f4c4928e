"""`moeprune run` end to end on a tiny model: OUT/ contents, report contract, cache reuse, bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprune.cli import cli
from moeprune.commands import pipeline_cmds, surgery  # noqa: F401
from moeprune.testing import save_tiny

HERE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = save_tiny(root / "tiny")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(f"{i} + {i * 3} = {i * 4}. The cat sat on mat number {i}." for i in range(40)))
    task_data = root / "task.jsonl"
    task_data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6)))
    (root / "task.yaml").write_text(f"name: tiny_add\ndata: {task_data}\nscorer: numeric_match\n"
                                    "generation: {max_new_tokens: 4, stop: ['\\n']}\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"# tiny\nmodel: {model}\nmethod: reap\nratio: 0.5\n"
                      f"calibration: {{spec: '{calib}', max_length: 32, batch_size: 4}}\n"
                      f"eval: {{tasks: ['{root / 'task.yaml'}'], limit: 4, batch_size: 4}}\n")
    return root, model, recipe


def _invoke(*args, env=None):
    return CliRunner(env=env).invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_model_observations_and_report(setup, tmp_path, monkeypatch):
    root, model, recipe = setup
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = _invoke("run", recipe, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    comp = report["compression"]
    assert comp["method"] == "reap" and comp["ratio"] == 0.5
    assert comp["experts_before"] == 8 and comp["experts_after"] == 4
    assert comp["bytes_after"] < comp["bytes_before"]
    assert set(comp["kept"]) == {"0", "1"} and all(len(v) == 4 for v in comp["kept"].values())
    assert "protected" in comp
    for side in ("base", "compressed"):
        assert report["eval"][side]["tiny_add"]["n"] == 4
        assert 0 <= report["eval"][side]["tiny_add"]["score"] <= 1
    for stage in ("observe", "score", "compress", "eval_base", "eval_compressed", "total"):
        assert stage in report["timings"]
    assert report["observations"]["reused"] is False
    assert (out / "observations" / "observations.safetensors").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "moeprune.json").read_text())["kept"] == comp["kept"]
    # loads in stock transformers with the expected expert count
    code = (f"from transformers import AutoModelForCausalLM as A; import sys; m = A.from_pretrained({str(out)!r}); "
            "assert 'moeprune' not in sys.modules; print(m.config.num_local_experts)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "4"

    # a rerun reuses the cached observations and may change the ratio without recalibrating
    result = _invoke("run", recipe, "-o", out, "--overwrite", "--no-progress", "--set", "ratio=0.25")
    assert result.exit_code == 0, result.output
    again = json.loads((out / "report.json").read_text())
    assert again["observations"]["reused"] is True and "reusing cached observations" in result.output
    assert again["compression"]["experts_after"] == 6


def test_observe_then_prune_from_observations(setup, tmp_path):
    root, model, _ = setup
    obs = tmp_path / "obs"
    result = _invoke("observe", model, "-o", obs, "--calib", root / "calib.txt", "--max-length", 32)
    assert result.exit_code == 0, result.output
    result = _invoke("prune", model, "-o", tmp_path / "p", "--method", "ean", "--keep-experts", 6,
                     "--observations", obs)
    assert result.exit_code == 0, result.output
    prov = json.loads((tmp_path / "p" / "moeprune.json").read_text())
    assert prov["method"] == "ean" and all(len(v) == 6 for v in prov["kept"].values())


def test_observe_text_field_option(setup, tmp_path):
    root, model, _ = setup
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"{i} plus {i} is {2 * i}"}) + "\n" for i in range(40)))
    line = _error(_invoke("observe", model, "-o", tmp_path / "a", "--calib", rows, "--max-length", 32))
    assert "no 'text' field" in line and "--text-field" in line
    result = _invoke("observe", model, "-o", tmp_path / "b", "--calib", rows, "--max-length", 32,
                     "--text-field", "body")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "b" / "observations.json").read_text())
    assert meta["num_tokens"] > 0


def _error(result):
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "Traceback" not in result.output
    return last


def test_observations_from_another_model_refused(setup, tmp_path):
    root, model, _ = setup
    other = save_tiny(tmp_path / "other", seed=3)
    obs = tmp_path / "obs"
    assert _invoke("observe", other, "-o", obs, "--calib", root / "calib.txt", "--max-length", 32).exit_code == 0
    line = _error(_invoke("prune", model, "-o", tmp_path / "p", "--method", "reap", "--ratio", 0.5,
                          "--observations", obs))
    assert "collected on a different model" in line


def test_bad_pipeline_inputs(setup, tmp_path):
    root, model, recipe = setup
    assert "keep between top-k=2 and 8" in _error(_invoke("run", recipe, "-o", tmp_path / "o", "--set", "keep=1"))
    assert "does not exist" in _error(_invoke("run", recipe, "-o", tmp_path / "o",
                                              "--set", f"calibration.spec={tmp_path / 'nope.txt'}"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _error(_invoke("run", recipe, "-o", tmp_path / "o", "--set", f"calibration.spec={empty}"))
    assert "unknown method" in _error(_invoke("prune", model, "-o", tmp_path / "o", "--method", "nope",
                                              "--ratio", 0.5))
    assert "must be in (0, 1)" in _error(_invoke("prune", model, "-o", tmp_path / "o", "--method", "reap",
                                                 "--ratio", 1.2))
    assert not (tmp_path / "o").exists()


def test_run_with_quantization_stage(setup, tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    root, model, recipe = setup
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    result = _invoke("run", recipe, "-o", out, "--no-progress", "--set", "quantize.bits=8")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    stages = report["sizes"]["stages"]
    assert list(stages) == ["base", "compressed", "compressed+quantized"]
    assert stages["compressed+quantized"]["bytes"] < stages["compressed"]["bytes"] < stages["base"]["bytes"]
    assert report["quantization"]["bits"] == 8 and "tiny_add" in report["eval"]["quantized"]
    assert report["sizes"]["files_on_disk"] < stages["compressed"]["bytes"]
    assert "## Bytes and quality" in (out / "report.md").read_text()
    code = (f"from transformers import AutoModelForCausalLM as A; import sys; m = A.from_pretrained({str(out)!r}); "
            "assert 'moeprune' not in sys.modules; print(m.config.num_local_experts)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "4"


def test_prune_by_reconstruction_from_the_cli(setup, tmp_path, monkeypatch):
    root, model, _ = setup
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    result = _invoke("prune", model, "-o", tmp_path / "r", "--method", "reconstruct", "--keep-experts", 6,
                     "--calib", root / "calib.txt", "--max-length", 32)
    assert result.exit_code == 0, result.output
    prov = json.loads((tmp_path / "r" / "moeprune.json").read_text())
    assert prov["method"] == "reconstruct" and all(len(v) == 6 for v in prov["kept"].values())
