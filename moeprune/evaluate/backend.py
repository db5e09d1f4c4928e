"""The model side of evaluation: one narrow protocol and its Hugging Face implementation.

A backend answers two kinds of request, each for a list of inputs, in input order:

- ``generate(prompts, max_new_tokens=..., stop=...) -> list[str]``: greedy completions, each cut
  at the first stop string;
- ``token_nll(texts) -> list[tuple[float, int]]``: per text, the summed negative log-likelihood
  (nats) of every token after the first, and how many tokens that is.

``desc`` only labels the progress bar.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["Backend", "HFBackend", "truncate_at_stop", "rows_nll"]


class Backend(Protocol):
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generate") -> list[str]:
        ...

    def token_nll(self, texts: Sequence[str], *, desc: str = "nll") -> list[tuple[float, int]]:
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text (after ``prompt_len``) contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


@contextlib.contextmanager
def _sides(tokenizer, *, padding: str, truncation: str = "right") -> Iterator[None]:
    """Temporarily set the tokenizer's padding and truncation sides."""
    old = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side, tokenizer.truncation_side = padding, truncation
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old


class HFBackend:
    """:class:`Backend` over a loaded transformers causal LM and its tokenizer.

    Generation is greedy (``do_sample=False``), batched with left padding; prompts are sorted by
    length so batches pad little, and results come back in input order. A prompt too long for
    ``context - max_new_tokens`` loses its oldest tokens; texts scored by :meth:`token_nll` are
    cut at the context length. If the tokenizer has no
    pad token, its EOS token is used as the pad token (the tokenizer is changed in place).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                    disable=not (self.progress and sys.stderr.isatty()))

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # longest first, stable
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _eos_ids(self) -> list[int] | int | None:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return eos if eos is not None else self.tokenizer.eos_token_id

    @torch.no_grad()  # not inference_mode: quantized tensor subclasses refuse inference tensors
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generate") -> list[str]:
        """Greedy completions of ``prompts`` (decoded without special tokens, cut at ``stop``)."""
        torch.manual_seed(0)  # greedy decoding needs no randomness; seeded anyway for reproducibility
        # Keep prompt + completion inside the context window by dropping the prompt's oldest tokens.
        room = {"truncation": True, "max_length": max(1, self._max_length() - max_new_tokens)}
        out: list[str] = [""] * len(prompts)
        with self._bar(len(prompts), desc) as bar, _sides(self.tokenizer, padding="left", truncation="left"):
            lengths = [len(ids) for ids in self.tokenizer(list(prompts), **room)["input_ids"]]
            for idx in self._batches(lengths):
                enc = self.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, **room)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                prompt_len = enc["input_ids"].shape[1]
                criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stop, prompt_len)] if stop else [])
                gen = self.model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens, stopping_criteria=criteria,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._eos_ids(),
                    temperature=None, top_p=None, top_k=None,
                )  # (B, prompt_len + new)
                texts = self.tokenizer.batch_decode(gen[:, prompt_len:], skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = truncate_at_stop(text, stop)
                bar.update(len(idx))
        return out

    def _model_config(self):
        return self.model.config

    def _max_length(self) -> int:
        limits = [getattr(self._model_config(), "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]
        return min(limits) if limits else 2048

    def _nll_batches(self, texts: Sequence[str]) -> Iterator[tuple[list[int], dict]]:
        """(row indices, right-padded `input_ids`/`attention_mask` on CPU) per batch of `texts`, longest first;
        texts longer than the model's context are truncated."""
        enc_all = self.tokenizer(list(texts), truncation=True, max_length=self._max_length())["input_ids"]
        with _sides(self.tokenizer, padding="right"):
            for idx in self._batches([len(ids) for ids in enc_all]):
                yield idx, self.tokenizer.pad({"input_ids": [enc_all[i] for i in idx]}, return_tensors="pt")

    @torch.no_grad()  # not inference_mode: quantized tensor subclasses refuse inference tensors
    def token_nll(self, texts: Sequence[str], *, desc: str = "nll") -> list[tuple[float, int]]:
        """Per text: (sum of NLL over tokens 2..L, L - 1). Texts longer than the model's context are truncated."""
        out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
        with self._bar(len(texts), desc) as bar:
            for idx, batch in self._nll_batches(texts):
                ids = batch["input_ids"].to(self.device)  # (B, T)
                mask = batch["attention_mask"].to(self.device)  # (B, T)
                # no KV cache: nothing follows this forward (a layer-by-layer model would keep every layer's)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
                rows_nll(logits, ids, mask, idx, out)
                bar.update(len(idx))
        return out


def rows_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, idx: Sequence[int],
             out: list[tuple[float, int]]) -> None:
    """For each row of one right-padded batch: out[idx[row]] = (summed NLL of tokens 2..n, n - 1)."""
    for row, i in enumerate(idx):
        n = int(mask[row].sum())
        if n < 2:
            out[i] = (0.0, 0)
            continue
        logp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)  # (n-1, V)
        nll = -logp.gather(-1, ids[row, 1:n, None]).sum()
        out[i] = (float(nll), n - 1)
