"""Model card rendering, provenance completion, and the upload path against a local fake of the hub API."""

import json
import shutil

import pytest
from click.testing import CliRunner

import moeprune.commands  # noqa: F401
from moeprune.cli import cli
from moeprune.errors import MoePruneError
from moeprune.publish import ensure_provenance, publish_folder, write_model_card

REPORT = {
    "moeprune_version": "9.8.7",
    "model": {"path": "acme/tiny-moe", "architecture": "MixtralForCausalLM", "model_type": "mixtral"},
    "recipe": {"method": "reap", "ratio": 0.25, "calibration": "demo:64"},
    "calibration": {"spec": "demo:64", "num_tokens": 12345, "used_default": True},
    "observations": {"reused": False, "num_tokens": 12345, "fingerprint": "abc"},
    "compression": {"method": "reap", "ratio": 0.25, "keep": 6, "allocation": "uniform",
                    "experts_before": 8, "experts_after": 6, "params_before": 1_000_000, "params_after": 800_000,
                    "bytes_before": 4_000_000, "bytes_after": 3_200_000, "expert_bytes_before": 3_000_000,
                    "expert_bytes_after": 2_250_000, "kept": {"0": [0, 1, 2, 4, 5, 7], "1": [1, 2, 3, 4, 6, 7]},
                    "dropped": {"0": [3, 6], "1": [0, 5]}, "protected": {}, "never_routed": {}},
    "eval": {"base": {"ppl": {"score": 12.5, "n": 40, "metric": "perplexity", "higher_is_better": False}},
             "compressed": {"ppl": {"score": 13.75, "n": 40, "metric": "perplexity", "higher_is_better": False}},
             "retained": {"ppl": 0.9091}},
    "timings": {"total": 1.0},
}


def _folder(tmp_path, *, report=True, provenance=None):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x" * 1234)
    if report:
        (out / "report.json").write_text(json.dumps(REPORT))
    if provenance is not None:
        (out / "moeprune.json").write_text(json.dumps(provenance))
    return out


def test_card_holds_the_report_numbers(tmp_path):
    out = _folder(tmp_path, provenance={"moeprune_version": "9.8.7", "scores": {"0": [0.1] * 8}})
    text = write_model_card(out).read_text()
    assert text.startswith("---\n")
    for needle in ("base_model: acme/tiny-moe", "library_name: transformers", "- moe", "- pruned", "- moeprune",
                   "moeprune 9.8.7", "`reap`", "| ratio (experts dropped per layer) | 0.25 |", "8 → 6",
                   "4.00 MB → 3.20 MB", "3.00 MB → 2.25 MB", "1,000,000 → 800,000", "| ppl | perplexity | 12.5 | 13.75 | 0.9091 | 40 |",
                   "0, 1, 2, 4, 5, 7", "12345", '"calibration": "demo:64"', "1.23 KB"):
        assert needle in text, needle


def test_prune_folder_renders_what_exists(tmp_path):
    prov = {"moeprune_version": "0.1.0", "base_model": "/data/src-model", "method": "keep-file",
            "kept": {"1": [0, 2, 5]}}
    text = write_model_card(_folder(tmp_path, report=False, provenance=prov)).read_text()
    assert "`keep-file`" in text and "0, 2, 5" in text and "`src-model`" in text
    assert "/data/" not in text  # no absolute local path in a published card
    assert "base_model:" not in text  # a local path is not a hub id
    assert "Evaluation" not in text and "Recipe" not in text


def test_provenance_is_completed_never_dropped(tmp_path):
    out = _folder(tmp_path, provenance={"moeprune_version": "9.8.7", "scores": {"0": [1.0]}, "method": "mine"})
    record = json.loads(ensure_provenance(out).read_text())
    assert record["scores"] == {"0": [1.0]} and record["method"] == "mine"  # existing fields kept as they were
    assert record["kept"] == REPORT["compression"]["kept"] and record["dropped"] == REPORT["compression"]["dropped"]
    assert record["recipe"] == REPORT["recipe"]


class FakeApi:
    """Stands in for `HfApi`: copies the folder into a local 'hub' directory."""

    def __init__(self, hub):
        self.hub, self.calls = hub, []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **_):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, token=None, **_):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, self.hub / repo_id)


def test_fake_upload_receives_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    out = _folder(tmp_path)
    fake = FakeApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    result = CliRunner().invoke(cli, ["publish", str(out), "--repo-id", "me/tiny-pruned", "--private"])
    assert result.exit_code == 0, result.output
    assert fake.calls == [("create_repo", "me/tiny-pruned", True), ("upload_folder", "me/tiny-pruned")]
    pushed = tmp_path / "hub" / "me" / "tiny-pruned"
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "moeprune.json", "report.json"]
    assert "pushed" in result.output


def test_missing_token_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("must not reach the hub"))
    out = _folder(tmp_path)
    result = CliRunner().invoke(cli, ["publish", str(out), "--repo-id", "me/x"])
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Hugging Face token" in lines[0] and "nothing pushed" in lines[0]
    assert (out / "README.md").is_file()


def test_failed_push_is_one_line_error(tmp_path):
    class Broken(FakeApi):
        def upload_folder(self, **_):
            raise ConnectionError("network is unreachable\nmore detail")

    with pytest.raises(MoePruneError, match="^push to me/x failed: network is unreachable$"):
        publish_folder(_folder(tmp_path), repo_id="me/x", token="t", api=Broken(tmp_path / "hub"))


def test_not_a_moeprune_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["publish", str(tmp_path)])
    assert result.exit_code == 2 and "not written by moeprune" in result.output


def test_card_paths_are_portable(tmp_path):
    from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR
    from moeprune.publish import portable

    out = tmp_path / "out"
    out.mkdir()
    recipe = {"model": str(DEMO_MODEL_DIR), "calibration": {"sources": [f"{tmp_path}/calib/code.jsonl:64"]},
              "eval": {"tasks": [str(out / "tasks" / "mine.yaml")]}, "ratio": 0.5}
    assert portable(recipe, out) == {"model": "demo", "calibration": {"sources": ["code.jsonl:64"]},
                                     "eval": {"tasks": ["tasks/mine.yaml"]}, "ratio": 0.5}
    assert portable("org/model", out) == "org/model"  # hub ids are not paths
