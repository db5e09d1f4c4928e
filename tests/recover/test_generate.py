"""recover.generate: logit KD also trains on the original model's own continuations of calibration rows.
Sampling follows the model's distribution (at a vanishing temperature it is greedy decoding), is
reproducible from the seed, stops at end of sequence and at the token budget, and the pipeline records
what was written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from moeprune.cli import cli
from moeprune.commands import surgery  # noqa: F401
from moeprune.errors import MoePruneError
from moeprune.pipeline.recipe import GenerateConfig, RecoverConfig, load_recipe
from moeprune.pipeline.run import run_recipe
from moeprune.report.markdown import recovery_line
from moeprune.recover.generate import kd_training_batches, sample_continuations, teacher_rows
from recover.common import calib_file as _calib
from recover.common import reap_recipe as _recipe
from moeprune.testing import TINY, save_tiny, tiny_model


def _tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny(tmp_path / "m", "qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder)


def _batches(rows: list[list[int]], width: int) -> list[dict]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    return [{"input_ids": ids, "attention_mask": mask}]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_a_vanishing_temperature_is_greedy_decoding(model_type):
    """Every family: the sampler's cache handling (attention, sliding window, linear attention, Mamba
    state) gives what transformers' own greedy generate() gives."""
    model = tiny_model(model_type).float()
    prompts = torch.tensor([[5, 9, 13], [7, 7, 21], [30, 2, 8]])
    got = sample_continuations(model, prompts, max_new_tokens=10, temperature=1e-6, eos_ids=set(),
                               generator=torch.Generator().manual_seed(0))
    want = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=10, min_new_tokens=10, eos_token_id=None, pad_token_id=0,
                          temperature=None, top_p=None, top_k=None)
    assert [r.tolist() for r in got] == want.tolist()


def test_sampling_is_seeded_and_stops_at_the_first_end_of_sequence(tmp_path):
    _, model, _ = _tiny(tmp_path)
    prompts = torch.tensor([[5, 9, 13, 4]] * 6)
    one = sample_continuations(model, prompts, max_new_tokens=20, temperature=1.0, eos_ids=set(),
                               generator=torch.Generator().manual_seed(1))
    again = sample_continuations(model, prompts, max_new_tokens=20, temperature=1.0, eos_ids=set(),
                                 generator=torch.Generator().manual_seed(1))
    other = sample_continuations(model, prompts, max_new_tokens=20, temperature=1.0, eos_ids=set(),
                                 generator=torch.Generator().manual_seed(2))
    assert [r.tolist() for r in one] == [r.tolist() for r in again]
    assert [r.tolist() for r in one] != [r.tolist() for r in other]
    assert len({tuple(r.tolist()) for r in one}) > 1  # sampled, not six copies of one greedy row
    assert all(len(r) == 24 and r[:4].tolist() == [5, 9, 13, 4] for r in one)
    # the token sampled first in row 0 becomes an end of sequence: that row ends right there, kept
    eos = int(one[0][4])
    cut = sample_continuations(model, prompts, max_new_tokens=20, temperature=1.0, eos_ids={eos},
                               generator=torch.Generator().manual_seed(1))
    assert cut[0].tolist() == one[0][:5].tolist()
    for row, full in zip(cut, one):  # every row: its prefix of the uncut sample, up to its first eos
        tail = full[4:].tolist()
        end = 4 + tail.index(eos) + 1 if eos in tail else len(full)
        assert row.tolist() == full[:end].tolist()


def test_teacher_rows_prompt_from_whole_rows_and_stop_at_the_budget(tmp_path):
    _, model, tok = _tiny(tmp_path)
    rows = [[3 + i, 4 + i, 5 + i, 6 + i, 7 + i, 8 + i] for i in range(10)] + [[1, 2]]  # the last: too short
    cfg = GenerateConfig(samples=3, prompt_tokens=4, batch_size=4)
    out, rec = teacher_rows(model, tok, _batches(rows, 8), cfg, max_length=8, budget=10**6, seed=0, progress=False)
    assert rec["prompts"] == 10 and rec["rows"] == 30 and rec["max_new_tokens"] == 4
    assert sorted(tuple(r[:4].tolist()) for r in out) == sorted(tuple(r[:4]) for r in rows[:10] for _ in range(3))
    assert all(5 <= len(r) <= 8 for r in out) and rec["tokens"] == sum(len(r) for r in out)
    small, rec_small = teacher_rows(model, tok, _batches(rows, 8), cfg, max_length=8, budget=40, seed=0,
                                    progress=False)
    assert len(small) == 8 and rec_small["rows"] == 8  # two batches of four: the first to pass 40 tokens ends it


def test_kd_training_batches_fill_the_token_budget_after_the_calibration_rows(tmp_path):
    _, model, tok = _tiny(tmp_path)
    calib = _batches([[3 + i, 4 + i, 5 + i, 6 + i, 7 + i, 8 + i] for i in range(8)], 8)  # 48 tokens
    recover = RecoverConfig(method="moe_kd", tokens=150, generate={"samples": 4, "prompt_tokens": 2, "batch_size": 4})
    batches, rec = kd_training_batches(model, tok, calib, recover, max_length=8, batch_size=4, seed=0, progress=False)
    assert batches[0] is calib[0]
    generated = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    assert generated == rec["tokens"] and 150 - 48 <= generated < 150 - 48 + 4 * 8
    assert rec["rows"] == sum(b["input_ids"].shape[0] for b in batches[1:])
    again, _ = kd_training_batches(model, tok, calib, recover, max_length=8, batch_size=4, seed=0, progress=False)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    full = RecoverConfig(method="moe_kd", tokens=40, generate=2)
    same, note = kd_training_batches(model, tok, calib, full, max_length=8, batch_size=4, seed=0, progress=False)
    assert same == calib and note["rows"] == 0 and "recover.tokens" in note["note"]
    long = RecoverConfig(method="moe_kd", tokens=150, generate={"prompt_tokens": 7})
    same, note = kd_training_batches(model, tok, calib, long, max_length=8, batch_size=4, seed=0, progress=False)
    assert same == calib and note["rows"] == 0 and "prompt_tokens" in note["note"]
    assert note["note"] in recovery_line({"method": "moe_kd", "steps": 1, "kl_before": 1.0, "kl_after": 0.5,
                                          "eval_tokens": 8, "eval_on": "x", "train_tokens": 48, "generated": note})
    plain, none = kd_training_batches(model, tok, calib, RecoverConfig(method="moe_kd"), max_length=8, batch_size=4,
                                      seed=0)
    assert plain == calib and none is None


def test_the_recipe_section_and_its_refusals(tmp_path):
    assert RecoverConfig(method="moe_kd", generate=4).generate == GenerateConfig(samples=4)
    assert RecoverConfig(method="router_kd", generate={"temperature": 0.7}).generate.samples == 4
    for bad in ({"method": "moe_kd_block", "generate": 2}, {"method": "moe_kd", "generate": 0},
                {"method": "moe_kd", "generate": {"temperature": 0}}, {"method": "moe_kd", "generate": {"top_p": 1}}):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": "demo", "method": "reap", "ratio": 0.5, "recover": bad}))
        with pytest.raises(MoePruneError) as err:
            load_recipe(path)
        assert "recover" in str(err.value) and "\n" not in str(err.value)


def test_moe_kd_on_generated_text_records_it_and_lowers_the_kl(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "qwen3_moe"), _calib(tmp_path / "calib.txt")
    recover = {"method": "moe_kd", "steps": 30, "lr": 1e-3, "tokens": 1200, "top_k": 1000,
               "generate": {"samples": 2, "prompt_tokens": 3}}
    report = run_recipe(_recipe(model, calib, recover=recover), out_dir=tmp_path / "kd", progress=False,
                        log=lambda *_: None)
    rec = report["recovery"]
    gen = rec["generated"]
    assert gen["rows"] > 0 and gen["prompt_tokens"] == 3 and gen["max_new_tokens"] == 29
    assert rec["train_tokens"] > gen["tokens"] > 0 and rec["train_tokens"] <= 1200 + 2 * 32
    assert rec["kl_after"] < rec["kl_before"]
    assert json.loads((tmp_path / "kd" / "moeprune.json").read_text())["recovery"]["generated"] == gen


def test_cli_recover_generate_needs_logit_kd(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "qwen3_moe"), _calib(tmp_path / "calib.txt")
    res = CliRunner().invoke(cli, ["prune", str(model), "-o", str(tmp_path / "o"), "--method", "reap", "--ratio", "0.5",
                                   "--calib", str(calib), "--recover", "moe_kd_block", "--recover-generate", "2"])
    assert res.exit_code != 0 and res.output.startswith("Error: ") and "generate" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
