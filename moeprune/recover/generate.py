"""Training text for logit KD written by the original model itself (`recover.generate`).

Calibration sets are small: the built-in one has a few hundred texts, and a recovery that trains the MoE
blocks for hundreds of steps on them fits those texts rather than the model (docs/study.md). The original
model can write as much more text as wanted, from its own distribution: each training row's first
`prompt_tokens` tokens are continued by sampling (temperature `temperature`, no top-k/top-p cut) until an
end-of-sequence token or the row's length, `samples` times per row, and the continuations join the
calibration rows as KD training data (data-free distillation from the teacher's own samples). Their targets
are the original model's next-token distributions like every other row; the held-back calibration rows,
which measure the result, are neither prompts nor training rows.

Sampling is plain ancestral sampling with the key/value cache, written here rather than through
`generate()` so that nothing from the checkpoint's generation_config (top-k, top-p, repetition penalty)
changes the distribution, and so that a seeded `torch.Generator` makes it reproducible.
"""

from __future__ import annotations

import inspect
import time

import torch

from moeprune.recover.router_kd import _mask as _row_mask
from moeprune.recover.router_kd import take_tokens

__all__ = ["kd_training_batches", "sample_continuations", "teacher_rows"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def _cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample_continuations(model, prompts: torch.Tensor, *, max_new_tokens: int, temperature: float,
                         eos_ids: set[int], generator: torch.Generator) -> list[torch.Tensor]:
    """Rows of `prompts` (N, P) continued by sampling; each row ends at its first end-of-sequence token
    (kept) or after `max_new_tokens` new tokens. Returns CPU tensors of the whole rows."""
    dev = next(model.parameters()).device
    ids = prompts.to(dev)
    # the model builds the cache its layers need (attention, sliding window, linear attention, Mamba state)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.x
    out = model(input_ids=ids, use_cache=True)
    cache, logits = _cache(out), out.logits[:, -1]
    eos = torch.tensor(sorted(eos_ids) or [-1], device=dev)
    new, done = [], torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
        new.append(nxt)
        done |= torch.isin(nxt[:, 0], eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        cache, logits = _cache(out), out.logits[:, -1]
    full = torch.cat([ids, *new], dim=1).cpu() if new else ids.cpu()
    rows = []
    for row in full:
        tail = torch.isin(row[prompts.shape[1]:], eos.cpu()).nonzero()
        rows.append(row[:prompts.shape[1] + int(tail[0]) + 1] if len(tail) else row)
    return rows


def _engine_rows(engine, prompts: list[torch.Tensor], cfg, *, new_tokens: int, eos: set[int], budget: int,
                 seed: int, progress: bool) -> list[torch.Tensor]:
    """teacher_rows on a sampling engine (vLLM): one request per prompt and round, every row once per round,
    request seeds derived from `seed`, rounds until `budget` tokens are written."""
    from tqdm.auto import tqdm

    rows: list[torch.Tensor] = []
    written = 0
    with tqdm(total=budget, desc="teacher text (vLLM)", unit="tok", disable=not progress) as bar:
        for round_ in range(cfg.samples):
            if written >= budget:
                break
            seeds = [(seed * 1_000_003 + round_ * len(prompts) + j) % 2**31 for j in range(len(prompts))]
            got = engine.sample([p.tolist() for p in prompts], max_new_tokens=new_tokens,
                                temperature=cfg.temperature, seeds=seeds, eos_ids=sorted(eos))
            rows.extend(torch.tensor(r, dtype=torch.long) for r in got)
            n = sum(len(r) for r in got)
            written += n
            bar.update(min(n, max(budget - bar.n, 0)))
    return rows


def teacher_rows(model, tokenizer, batches: list[dict], cfg, *, max_length: int, budget: int, seed: int,
                 progress: bool = True, engine=None) -> tuple[list[torch.Tensor], dict]:
    """The original model's continuations of the rows of `batches` (cfg: a GenerateConfig): every row once,
    then every row again, up to cfg.samples times, stopping once `budget` tokens are written. Rows shorter
    than cfg.prompt_tokens are no prompt. With `engine` (a `VLLMBackend` on the original model's folder) the
    engine samples, with the same temperature, prompts and stopping rule; else `model` with moeprune's
    sampler. Returns (rows in a seeded shuffled order, record)."""
    start = time.perf_counter()
    p = cfg.prompt_tokens
    prompts = [ids[:p] for b in batches for ids, mask in zip(b["input_ids"], _row_mask(b))
               if int(mask[:p].sum()) == p]  # the row's first p positions are all text
    if not prompts:
        return [], {"rows": 0, "tokens": 0, "prompts": 0,
                    "note": f"no training calibration row has {p} tokens to start from; lower prompt_tokens"}
    new_tokens = cfg.max_new_tokens or max(max_length - p, 1)
    eos = _eos_ids(model, tokenizer)
    if engine is not None:
        rows = _engine_rows(engine, prompts, cfg, new_tokens=new_tokens, eos=eos, budget=budget, seed=seed,
                            progress=progress)
    else:
        rows = _model_rows(model, prompts, cfg, new_tokens=new_tokens, eos=eos, budget=budget, seed=seed,
                           progress=progress)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[j] for j in order]
    record = {"engine": "vllm" if engine is not None else "hf", "samples": cfg.samples, "prompt_tokens": p,
              "max_new_tokens": new_tokens, "temperature": cfg.temperature, "prompts": len(prompts), "rows": len(rows),
              "tokens": sum(len(r) for r in rows), "seconds": round(time.perf_counter() - start, 1)}
    return rows, record


def _model_rows(model, prompts: list[torch.Tensor], cfg, *, new_tokens: int, eos: set[int], budget: int, seed: int,
                progress: bool) -> list[torch.Tensor]:
    """teacher_rows on the loaded model: batches of cfg.batch_size prompts, every row once per round, one seeded
    generator, until `budget` tokens are written."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows: list[torch.Tensor] = []
    written = 0
    starts = [i for _ in range(cfg.samples) for i in range(0, len(prompts), cfg.batch_size)]  # every row, again
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=budget, desc="teacher text", unit="tok", disable=not progress) as bar:
            for i in starts:
                if written >= budget:
                    break
                got = sample_continuations(model, torch.stack(prompts[i:i + cfg.batch_size]),
                                           max_new_tokens=new_tokens, temperature=cfg.temperature, eos_ids=eos,
                                           generator=gen)
                rows.extend(got)
                n = sum(len(r) for r in got)
                written += n
                bar.update(min(n, max(budget - bar.n, 0)))
    finally:
        model.train(was_training)
    return rows


def kd_training_batches(model, tokenizer, train: list[dict], recover, *, max_length: int, batch_size: int, seed: int,
                        progress: bool = True, engine=None) -> tuple[list[dict], dict | None]:
    """`train` (calibration batches) followed by batches of the original model's continuations when
    `recover.generate` is set, `recover.tokens` tokens in all (whole batches). Returns (batches, what was
    generated, or None)."""
    from moeprune.observe.calibration import pad_batches, pad_id

    cfg = recover.generate
    if cfg is None:
        return train, None
    budget = recover.tokens - sum(int(_row_mask(b).sum()) for b in train)
    if budget <= 0:
        return train, {"rows": 0, "tokens": 0, "note": f"the calibration rows already fill recover.tokens "
                                                       f"({recover.tokens}); raise it to train on generated text"}
    rows, record = teacher_rows(model, tokenizer, train, cfg, max_length=max_length, budget=budget, seed=seed,
                                progress=progress, engine=engine)
    batches, used = take_tokens(pad_batches(rows, pad=pad_id(tokenizer), batch_size=batch_size), budget)
    record.update(rows=sum(b["input_ids"].shape[0] for b in batches), tokens=used)
    return train + batches, record
