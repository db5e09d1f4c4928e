"""Calibration data: local text/JSONL/CSV/Parquet files, `datasets` folders, the built-in demo set.

Spec grammar (comma-separated): `SOURCE[:N]`, N = rows drawn from that source (seeded shuffle; all
rows when absent). SOURCE is `demo` (all five demo domains), `demo/<domain>` or a bare domain name
(`arith`, `code`, `prose`, `json`, `program`), a local file (`.txt` split on blank lines, `.jsonl` /
`.json` with a text field or chat `messages`, `.csv` / `.parquet` through `datasets`), or a folder
written by `datasets.Dataset.save_to_disk`. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moeprune.errors import MoePruneError

__all__ = ["CalibrationSource", "CalibrationSpec", "CalibrationSet", "parse_calibration_spec", "load_calibration",
           "DEMO_DOMAINS", "DEMO_CALIB_DIR"]

DEMO_CALIB_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-corpus" / "calib"
DEMO_DOMAINS = ("arith", "code", "prose", "json", "program")


@dataclass(frozen=True)
class CalibrationSource:
    name: str
    count: int | None = None  # None = all rows


@dataclass(frozen=True)
class CalibrationSpec:
    sources: tuple[CalibrationSource, ...]
    max_length: int = 512
    pack: bool = True
    seed: int = 0
    chat_template: bool = False
    text_field: str = "text"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sources"] = [asdict(s) for s in self.sources]
        return d


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]
    spec: CalibrationSpec
    num_sequences: int
    num_tokens: int
    source_counts: dict[str, int] = field(default_factory=dict)
    used_default: bool = False

    def describe(self) -> dict:
        return {"spec": self.spec.to_dict(), "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                "source_counts": dict(self.source_counts), "used_default": self.used_default}


def _split_count(item: str) -> tuple[str, int | None]:
    name, sep, tail = item.rpartition(":")
    if sep and name and tail.strip().lstrip("-").isdigit():
        count = int(tail)
        if count <= 0:
            raise MoePruneError(f"calibration source {item!r}: the count after ':' must be a positive integer")
        return name.strip(), count
    return item.strip(), None


def parse_calibration_spec(spec: str | None, *, max_length: int = 512, pack: bool = True, seed: int = 0,
                           chat_template: bool = False, text_field: str = "text") -> CalibrationSpec:
    """Parse `SOURCE[:N],...`; None or empty means the built-in `demo` set."""
    if max_length < 2:
        raise MoePruneError(f"calibration max_length must be at least 2 tokens; got {max_length}")
    items = [s for s in (spec or "").split(",") if s.strip()]
    sources = tuple(CalibrationSource(*_split_count(s)) for s in items) or (CalibrationSource("demo"),)
    for src in sources:
        _resolve(src.name)  # unknown domains and missing files fail before any tokenisation
    return CalibrationSpec(sources=sources, max_length=max_length, pack=pack, seed=seed,
                           chat_template=chat_template, text_field=text_field)


def _resolve(name: str) -> list[Path] | Path:
    """A demo name -> its JSONL files; a path -> itself (checked to exist)."""
    if name == "demo":
        return [DEMO_CALIB_DIR / f"{d}.jsonl" for d in DEMO_DOMAINS]
    domain = name[len("demo/"):] if name.startswith("demo/") else (name if name in DEMO_DOMAINS else None)
    if domain is not None:
        if domain not in DEMO_DOMAINS:
            raise MoePruneError(f"unknown demo calibration domain {domain!r}; available: {', '.join(DEMO_DOMAINS)}")
        return [DEMO_CALIB_DIR / f"{domain}.jsonl"]
    path = Path(name).expanduser()
    if not path.exists():
        raise MoePruneError(f"calibration file {path} does not exist (or use demo, demo/<domain>: "
                            f"{', '.join(DEMO_DOMAINS)})")
    return path


def _read_jsonl(path: Path, text_field: str) -> list:
    rows = []
    if path.suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        data = json.loads(path.read_text(encoding="utf-8"))
        return [_row_text(r, text_field, path, i + 1) for i, r in enumerate(data)]
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(_row_text(json.loads(line), text_field, path, lineno))
                except json.JSONDecodeError as exc:
                    raise MoePruneError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def _row_text(row, text_field: str, path: Path, lineno: int):
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    raise MoePruneError(f"{path}:{lineno}: row has no '{text_field}' field (or 'messages' list); set "
                        "calibration.text_field to the field holding the text")


def _read_source(name: str, text_field: str) -> list:
    target = _resolve(name)
    if isinstance(target, list):
        return [t for p in target for t in _read_jsonl(p, text_field)]
    if target.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(target))
        return _dataset_rows(ds, text_field, target)
    suffix = target.suffix.lower()
    if suffix == ".txt":
        return [d.strip() for d in target.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(target, text_field)
    if suffix in (".csv", ".parquet"):
        import datasets

        ds = datasets.load_dataset(suffix[1:], data_files=str(target), split="train")
        return _dataset_rows(ds, text_field, target)
    raise MoePruneError(f"calibration file {target}: unsupported type {suffix!r}; use .txt, .jsonl, .json, "
                        ".csv, .parquet or a save_to_disk folder")


def _dataset_rows(ds, text_field: str, where: Path) -> list:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: use its first split
        ds = ds[next(iter(ds.keys()))]
    if text_field in ds.column_names:
        return [str(t) for t in ds[text_field]]
    if "messages" in ds.column_names:
        return list(ds["messages"])
    raise MoePruneError(f"{where}: no '{text_field}' column (columns: {', '.join(ds.column_names)}); set "
                        "calibration.text_field")


def _render(row, tokenizer, chat: bool) -> str:
    if not chat:
        if isinstance(row, list):
            return "\n".join(str(m.get("content", "")) for m in row)
        return row
    messages = row if isinstance(row, list) else [{"role": "user", "content": row}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _sequences(texts: list[str], tokenizer, spec: CalibrationSpec) -> list[list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not spec.pack:
        return [(bos + x)[: spec.max_length] for x in ids if x]
    stream: list[int] = []
    for x in ids:
        stream += x + ([eos] if eos is not None else [])
    body = spec.max_length - len(bos)
    return [bos + stream[i:i + body] for i in range(0, len(stream), body) if stream[i:i + body]]


def _batches(seqs: list[list[int]], pad: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def load_calibration(spec: CalibrationSpec | str | None, tokenizer, *, batch_size: int = 8,
                     max_length: int | None = None) -> CalibrationSet:
    """Read, sample, (chat-)format, tokenise and pack/pad the calibration data into batches."""
    if spec is None or isinstance(spec, str):
        spec = parse_calibration_spec(spec, max_length=max_length or 512)
    elif max_length is not None:
        spec = CalibrationSpec(spec.sources, max_length, spec.pack, spec.seed, spec.chat_template, spec.text_field)
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        raise MoePruneError("calibration.chat_template is set but the tokenizer has no chat template; turn it off")
    rng = random.Random(spec.seed)
    texts, counts = [], {}
    for src in spec.sources:
        rows = _read_source(src.name, spec.text_field)
        rng.shuffle(rows)
        rows = rows[: src.count] if src.count is not None else rows
        counts[src.name] = len(rows)
        texts += [_render(r, tokenizer, spec.chat_template) for r in rows]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise MoePruneError(f"calibration set is empty: no text in {', '.join(s.name for s in spec.sources)}")
    seqs = _sequences(texts, tokenizer, spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = _batches(seqs, pad, batch_size)
    used_default = [s.name for s in spec.sources] == ["demo"]
    return CalibrationSet(batches=batches, spec=spec, num_sequences=len(seqs),
                          num_tokens=sum(len(s) for s in seqs), source_counts=counts, used_default=used_default)
