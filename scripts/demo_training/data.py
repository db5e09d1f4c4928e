"""Training data of the demo models: the five domains, the tokenizer trained on them, domain-mixed batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DOMAINS = ["arith", "code", "prose", "json", "program"]
GENERATIVE = ["arith", "json", "program"]
# generative domains are upweighted so that they get learned
DEFAULT_MIX = {"arith": 0.32, "code": 0.14, "prose": 0.12, "json": 0.14, "program": 0.28}
SPECIALS = ["<s>", "</s>", "<pad>"]

# --------------------------------------------------------------------------- tokenizer


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if limit is not None and len(out) >= limit:
                break
    return out


def train_tokenizer(corpus: Path, vocab_size: int, out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # a space right after ':' is always its own token, so prompts that end in ': '
        # (e.g. "A: ", "# output: ") tokenize exactly as they do inside training text
        pre_tokenizers.Split(Regex(r": "), behavior="merged_with_previous"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)

    def it():
        for d in DOMAINS:
            lim = 30000 if d in GENERATIVE else None
            for t in read_texts(corpus / d / "train.jsonl", lim):
                yield t

    tok.train_from_iterator(it(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", model_max_length=512)
    hf.save_pretrained(out_dir)
    return hf


# --------------------------------------------------------------------------- data


class DomainStream:
    """All training documents of one domain as one token array, with document starts."""

    def __init__(self, tok, texts: list[str]):
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        bos, eos = tok.bos_token_id, tok.eos_token_id
        lens = np.array([len(e) + 2 for e in enc], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        arr = np.empty(int(lens.sum()), dtype=np.int32)
        for s, e in zip(self.starts, enc):
            arr[s] = bos
            arr[s + 1:s + 1 + len(e)] = e
            arr[s + 1 + len(e)] = eos
        self.tokens = arr
        # only documents starting early enough to fill a window
        self.n_tokens = len(arr)

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        last_ok = np.searchsorted(self.starts, self.n_tokens - length, side="right")
        i = int(rng.integers(0, max(1, last_ok)))
        s = int(self.starts[i])
        return self.tokens[s:s + length]


# --------------------------------------------------------------------------- evaluation
