"""Router KD: lowers the KL to the original on held-back tokens, changes only router tensors, reloads
in stock transformers, deterministic, run under layer-wise execution and refused there over budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeprune.errors import MoePruneError
from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.run import run_recipe
from moeprune.recover import RouterKD, kd_loss, router_parameters
from recover.common import calib_file as _calib
from recover.common import reap_recipe as _recipe
from moeprune.testing import save_tiny, tiny_model

TESTS = Path(__file__).resolve().parents[1]


def _stock_logits(tmp_path, folders: dict[str, Path], ids: list[list[int]]) -> dict[str, dict]:
    jobs = [{"model_dir": str(f), "input_ids": ids, "out": str(tmp_path / f"{k}.st")} for k, f in folders.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(TESTS / "stock_loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: load_file(tmp_path / f"{k}.st") for k in folders}


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    t, s = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_kd_loss_is_the_exact_kl_with_the_full_vocabulary():
    teacher, student = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    logp = F.log_softmax(teacher, -1)
    vals, idx = logp.topk(11, dim=-1)
    want = F.kl_div(F.log_softmax(student, -1), logp, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kd_loss(student, idx, vals, torch.ones(2, 3, dtype=torch.bool)), want)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # padding is left out
    per = F.kl_div(F.log_softmax(student, -1), logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_loss(student, idx, vals, mask), per[mask].mean())


def test_kd_loss_with_a_top_k_keeps_the_rest_of_the_vocabulary_as_one_outcome():
    """With k < V the loss is the KL over the k tokens plus "any other token": zero for a student equal
    to the teacher (renormalising over the top-k would not be), and equal to a hand computation."""
    teacher, student = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    logp = F.log_softmax(teacher, -1)
    vals, idx = logp.topk(4, dim=-1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert abs(float(kd_loss(teacher, idx, vals, mask))) < 1e-6
    t = torch.cat([vals.exp(), 1 - vals.exp().sum(-1, keepdim=True)], -1).double()
    sp = F.softmax(student, -1).gather(-1, idx)
    s = torch.cat([sp, 1 - sp.sum(-1, keepdim=True)], -1).double()
    want = (t * (t.log() - s.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(student, idx, vals, mask).double(), want, rtol=1e-5, atol=1e-6)


def test_router_kd_recovers_only_router_tensors_and_reloads_stock(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "gpt_oss"), _calib(tmp_path / "calib.txt")  # router weight + bias
    plain = tmp_path / "plain"
    run_recipe(_recipe(model, calib), out_dir=plain, progress=False, log=lambda *_: None)
    kd = tmp_path / "kd"
    report = run_recipe(_recipe(model, calib, recover={"steps": 30, "lr": 0.01, "tokens": 200, "top_k": 1000}),
                        out_dir=kd, progress=False, log=lambda *_: None)
    rec = report["recovery"]
    assert rec["method"] == "router_kd" and rec["eval_on"] == "held-back calibration tokens"
    assert rec["kl_after"] < rec["kl_before"]
    assert sorted(rec["trained"]) == ["router.bias", "router.weight"]
    assert json.loads((kd / "moeprune.json").read_text())["recovery"] == rec
    # only router tensors differ from plain pruning
    a, b = load_file(plain / "model.safetensors"), load_file(kd / "model.safetensors")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".mlp.router." in k for k in changed), changed
    assert len(changed) == 2 * 2  # weight and bias of both MoE layers
    # held-back text of the calibration kind, never seen in calibration: the recovered model is closer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [tok(f"{i} + {i * 3} = {i * 4}. The cat sat on mat {i}; x = [{i}, {i + 1}].")["input_ids"]
            for i in (40, 57, 83)]
    ids = [r[:min(map(len, rows))] for r in rows]
    out = _stock_logits(tmp_path, {"base": model, "plain": plain, "kd": kd}, ids)
    kl_plain = _kl(out["base"]["logits"], out["plain"]["logits"])
    kl_kd = _kl(out["base"]["logits"], out["kd"]["logits"])
    assert kl_kd < kl_plain, (kl_kd, kl_plain)


def test_router_kd_is_deterministic_and_trains_router_parameters_only():
    model, ids = tiny_model("qwen2_moe"), torch.randint(3, 128, (6, 2, 12))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    results = []
    for _ in range(2):
        student = tiny_model("qwen2_moe")
        with torch.no_grad():  # a perturbed router stands in for compression
            for _, _, p in router_parameters(student).values():
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        before = {k: v.clone() for k, v in student.state_dict().items()}
        kd = RouterKD(steps=10, lr=0.01, top_k=8, seed=3, train=batches[:5], held=batches[5:])
        kd.compute_targets(model)
        summary = kd.fit(student, progress=False)
        after = student.state_dict()
        moved = {k for k in after if not torch.equal(after[k], before[k])}
        assert moved and all(k.endswith(".mlp.gate.weight") for k in moved), moved
        assert all(p.requires_grad for p in student.parameters())  # flags restored
        results.append((summary, {k: after[k] for k in moved}))
    (s1, t1), (s2, t2) = results
    assert s1 == s2 and t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_layerwise_recovery_is_planned_and_refused_over_budget(tmp_path):
    from moeprune.pipeline.plan import make_plan

    model, calib = save_tiny(tmp_path / "m", "mixtral"), _calib(tmp_path / "calib.txt")
    plan = make_plan(_recipe(model, calib, execution="layerwise", recover={}), out_dir=tmp_path / "o")
    assert plan.execution == "layerwise" and plan.recovery_row.method == "router_kd"
    with pytest.raises(MoePruneError, match=r"recover: router_kd needs about .* layer-wise \(streamed\)"):
        make_plan(_recipe(model, calib, execution="layerwise", max_memory="100kB", recover={}), out_dir=tmp_path / "o")


def test_recover_section_rejects_unknown_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stepz"):
        Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"stepz": 3}})
    with pytest.raises(ValidationError):
        Recipe.model_validate({"model": "demo", "ratio": 0.5, "recover": {"method": "full_finetune"}})


def test_merge_cli_runs_ream_with_router_kd_in_memory_and_layerwise(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moeprune.cli import cli
    from moeprune.commands import surgery  # noqa: F401

    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "cache"))
    model, calib = save_tiny(tmp_path / "m", "mixtral"), _calib(tmp_path / "calib.txt")
    common = ["merge", model, "--method", "ream", "--keep-experts", 4, "--calib", calib, "--max-length", 32,
              "--batch-size", 4, "--recover", "router_kd", "--recover-steps", 3]
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "-o", tmp_path / "out", "--execution", "memory"]])
    assert res.exit_code == 0, res.output
    assert "router_kd: 3 steps; KL to the original" in res.output
    record = json.loads((tmp_path / "out" / "moeprune.json").read_text())
    assert record["method"] == "ream" and record["recovery"]["steps"] == 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4
    res = CliRunner().invoke(cli, [str(a) for a in [*common, "-o", tmp_path / "lw", "--execution", "layerwise"]])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "lw" / "moeprune.json").read_text())["recovery"]["steps"] == 3
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a)
