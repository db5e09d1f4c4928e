"""Held-out greedy evaluation during training: exact / numeric match on the generative domains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from demo_training.data import GENERATIVE


def _first_line(s: str) -> str:
    return s.split("\n", 1)[0]


def extract_number(s: str) -> str | None:
    line = _first_line(s)
    m = re.search(r"####\s*(-?\d+)", line)
    if m:
        return m.group(1)
    nums = re.findall(r"-?\d+", line)
    return nums[-1] if nums else None


def score(domain: str, generated: str, answer: str) -> bool:
    if domain == "arith":
        return extract_number(generated) == answer.strip()
    if domain == "json":
        return " ".join(_first_line(generated).split()) == " ".join(answer.split())
    return _first_line(generated).strip() == answer.strip()


@torch.no_grad()
def greedy_eval(model, tok, rows_by_domain: dict, device: str, batch_size: int = 50,
                max_new_tokens: dict | None = None) -> dict:
    """Greedy decoding on held-out prompts; returns exact-match accuracy per domain."""
    max_new_tokens = max_new_tokens or {"arith": 64, "json": 40, "program": 24}
    was_training, was_router = model.training, model.config.output_router_logits
    model.eval()
    model.config.output_router_logits = False  # aux loss in generate() breaks with padding
    tok.padding_side = "left"
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    stop = [tok.eos_token_id] + ([nl[0]] if len(nl) == 1 else [])
    res = {}
    for d, rows in rows_by_domain.items():
        correct = 0
        samples = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens[d], do_sample=False,
                                 eos_token_id=stop, pad_token_id=tok.pad_token_id)
            gen = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, g in zip(chunk, gen):
                ok = score(d, g, r["answer"])
                correct += ok
                if len(samples) < 3:
                    samples.append({"prompt": r["prompt"], "gen": _first_line(g), "answer": r["answer"]})
        res[d] = {"acc": correct / max(1, len(rows)), "n": len(rows), "samples": samples}
    model.train(was_training)
    model.config.output_router_logits = was_router
    return res


def load_eval_rows(assets: Path, n: int | None = None) -> dict:
    out = {}
    for d in GENERATIVE:
        rows = [json.loads(l) for l in open(assets / "eval" / f"{d}.jsonl", encoding="utf-8")]
        out[d] = rows[:n] if n else rows
    return out


# --------------------------------------------------------------------------- main
