"""Calibration data: local text/JSONL/CSV/Parquet files, `datasets` folders, the built-in demo set.

Spec grammar (comma-separated): `SOURCE[:N]`, N = rows drawn from that source (seeded shuffle; all
rows when absent). SOURCE is `demo` (all five demo domains), `demo/<domain>` or a bare domain name
(`arith`, `code`, `prose`, `json`, `program`), a local file (`.txt` split on blank lines, `.jsonl` /
`.json` with a text field or chat `messages`, `.csv` / `.parquet` through `datasets`), or a folder
written by `datasets.Dataset.save_to_disk`. Nothing is ever fetched from a hub.

No spec (None or empty) means the built-in `demo` set; the resulting `CalibrationSet.used_default`
is True so callers can say so. Example::

    spec = parse_calibration_spec("code:256,arith:128,/data/chat.jsonl:64", max_length=1024)
    calib = load_calibration(spec, tokenizer, batch_size=8)
    calib.batches[0]["input_ids"]     # (8, 1024) long; attention_mask 0 on right padding
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text
from moeprune.registry import Registry

__all__ = ["CalibrationSource", "CalibrationSpec", "CalibrationSet", "parse_calibration_spec", "load_calibration",
           "DEMO_DOMAINS", "DEMO_CALIB_DIR", "DEFAULT_SOURCE", "pad_batches", "pad_id"]

DEMO_CALIB_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-corpus" / "calib"
DEMO_DOMAINS = ("arith", "code", "prose", "json", "program")
DEFAULT_SOURCE = "demo"

Row = Union[str, list]  # plain text, or a chat `messages` list of {"role", "content"} dicts
Reader = Callable[..., list]  # reader(path, *, text_field, prefer_messages) -> list[Row]
_READERS: Registry[Reader] = Registry("calibration file type")
_TOKENIZE_CHUNK = 256  # texts per tokenizer call


@dataclass(frozen=True)
class CalibrationSource:
    """One `SOURCE[:N]` item: `count` rows drawn from `name` (None = all rows)."""

    name: str
    count: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise MoePruneError(f"calibration source name must be a non-empty string; got {self.name!r}")
        bad = isinstance(self.count, bool) or not isinstance(self.count, (int, type(None)))
        if bad or (self.count is not None and self.count <= 0):
            raise MoePruneError(f"calibration source {self.name!r}: the count must be a positive integer; "
                                f"got {self.count!r}")


@dataclass(frozen=True)
class CalibrationSpec:
    """What to read and how to turn it into token batches. Empty `sources` = the built-in demo set."""

    sources: tuple[CalibrationSource, ...]
    max_length: int = 512  # tokens per sequence
    pack: bool = True  # concatenate texts (EOS-separated), cut into max_length chunks; else one text per row
    seed: int = 0
    chat_template: bool = False
    text_field: str = "text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise MoePruneError(f"calibration max_length must be an integer of at least 2 tokens; "
                                f"got {self.max_length!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise MoePruneError("calibration text_field must be a non-empty column name (default 'text')")

    @property
    def is_default(self) -> bool:
        """True when no source was given, so the built-in demo set stands in."""
        return not self.sources

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = [dataclasses.asdict(s) for s in self.sources]
        return d


@dataclass
class CalibrationSet:
    """Token batches ready for a forward pass, plus what went into them."""

    batches: list[dict[str, torch.Tensor]]  # {"input_ids": (B, S) long, "attention_mask": (B, S) long}
    spec: CalibrationSpec
    num_sequences: int
    num_tokens: int  # non-padding tokens
    source_counts: dict[str, int] = field(default_factory=dict)  # rows drawn per source
    used_default: bool = False

    def describe(self) -> dict:
        return {"spec": self.spec.to_dict(), "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                "num_batches": len(self.batches), "source_counts": dict(self.source_counts),
                "used_default": self.used_default}


# -- spec parsing ---------------------------------------------------------------------------------
def _demo_files(name: str) -> list[Path] | None:
    """The demo JSONL files `name` stands for, or None when `name` is not a demo source."""
    if name == "demo":
        domains: tuple[str, ...] = DEMO_DOMAINS
    elif name in DEMO_DOMAINS:
        domains = (name,)
    elif name.startswith("demo/"):
        domain = name[len("demo/"):]
        if domain not in DEMO_DOMAINS:
            if Path(name).expanduser().exists():
                return None  # a local path that happens to start with demo/
            raise MoePruneError(f"unknown demo calibration domain {domain!r}; available: {', '.join(DEMO_DOMAINS)}")
        domains = (domain,)
    else:
        return None
    files = [DEMO_CALIB_DIR / f"{d}.jsonl" for d in domains]
    for f in files:
        if not f.is_file():
            raise MoePruneError(f"built-in calibration file {f} is missing (broken install?); "
                                "reinstall moeprune or pass your own calibration data")
    return files


def _resolve(name: str) -> list[Path] | Path:
    """A demo name -> its JSONL files; anything else is a local path, checked to exist."""
    files = _demo_files(name)
    if files is not None:
        return files
    path = Path(name).expanduser()
    if not path.exists():
        raise MoePruneError(f"calibration file {path} does not exist; pass an existing file or folder, or "
                            f"demo, demo/<domain> ({', '.join(DEMO_DOMAINS)})")
    return path


def _split_count(item: str) -> tuple[str, int | None]:
    """`SOURCE[:N]` -> (SOURCE, N). Only an integer suffix is a count, so `C:/x.txt` stays a path."""
    item = item.strip()
    head, sep, tail = item.rpartition(":")
    head, tail = head.strip(), tail.strip()
    if not sep or not head:
        return item, None
    if re.fullmatch(r"[+-]?\d+", tail):
        count = int(tail)
        if count <= 0:
            raise MoePruneError(f"calibration source {item!r}: the count after ':' must be a positive integer")
        return head, count
    # '1.5', '1e3', '-', '' are typos of a count, not parts of a path
    looks_numeric = tail == "" or bool(re.fullmatch(r"[+-]?[\d.eE_]*", tail) and re.search(r"\d|^[+-]$", tail))
    head_is_source = head == "demo" or head in DEMO_DOMAINS or head.startswith("demo/") \
        or Path(head).expanduser().exists()
    if (looks_numeric or head_is_source) and not Path(item).expanduser().exists():
        raise MoePruneError(f"calibration source {item!r}: the count after ':' must be a positive integer "
                            f"(e.g. {head}:128)")
    return item, None


def parse_calibration_spec(spec: str | None, *, max_length: int = 512, pack: bool = True, seed: int = 0,
                           chat_template: bool = False, text_field: str = "text") -> CalibrationSpec:
    """Parse `SOURCE[:N],...`; None or empty gives no sources, i.e. the built-in `demo` set.

    Unknown demo domains, missing files and bad counts fail here, before any model is loaded.
    """
    items = [s for s in (spec or "").split(",") if s.strip()]
    sources = tuple(CalibrationSource(*_split_count(s)) for s in items)
    for src in sources:
        _resolve(src.name)
    return CalibrationSpec(sources=sources, max_length=max_length, pack=pack, seed=seed,
                           chat_template=chat_template, text_field=text_field)


# -- readers: path -> rows ------------------------------------------------------------------------
def _row(obj, *, text_field: str, prefer_messages: bool, where: str) -> Row:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        text, messages = obj.get(text_field), obj.get("messages")
        has_text, has_messages = isinstance(text, str), isinstance(messages, list)
        if has_messages and (prefer_messages or not has_text):
            return messages
        if has_text:
            return text
        if text is not None and not has_messages:
            raise MoePruneError(f"{where}: field '{text_field}' is {_json_kind(text)}, not a string; write "
                                f"the row's text as a JSON string (\"{text_field}\": \"...\")")
    raise MoePruneError(f"{where}: row has no '{text_field}' field (nor a 'messages' list); set "
                        "calibration.text_field (recipe) or --text-field (command line) to the field that holds the text")


def _json_kind(value) -> str:
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


@_READERS.register(".jsonl")
@_READERS.register(".json")
def _read_json(path: Path, *, text_field: str, prefer_messages: bool) -> list[Row]:
    """A JSON array of rows, or JSON Lines (one row per line; blank lines skipped)."""
    raw = read_text(path, what="calibration file")
    if path.suffix.lower() == ".json" and raw.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            if raw.lstrip().startswith("["):
                raise MoePruneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
            data = None  # a '{' start may be JSON Lines; read it below
        if isinstance(data, list):
            return [_row(r, text_field=text_field, prefer_messages=prefer_messages, where=f"{path}: row {i}")
                    for i, r in enumerate(data, 1)]
        if isinstance(data, dict):  # a single object
            return [_row(data, text_field=text_field, prefer_messages=prefer_messages, where=str(path))]
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoePruneError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON row per line"
                                ) from None
        rows.append(_row(obj, text_field=text_field, prefer_messages=prefer_messages, where=f"{path}:{lineno}"))
    return rows


@_READERS.register(".txt")
def _read_txt(path: Path, **_: object) -> list[Row]:
    """Plain text: one document per block separated by blank lines."""
    raw = read_text(path, what="calibration file").replace("\r\n", "\n")
    return [d.strip() for d in re.split(r"\n[ \t]*\n", raw) if d.strip()]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise MoePruneError("reading CSV/Parquet/saved-dataset calibration data needs the `datasets` package: "
                            "pip install datasets") from None
    return datasets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dataset_rows(ds, *, text_field: str, prefer_messages: bool, where: Path) -> list[Row]:
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):  # a DatasetDict: first split
        ds = ds[next(iter(ds.keys()))]
    columns = ds.column_names
    use_messages = "messages" in columns and (prefer_messages or text_field not in columns)
    if use_messages:
        return [m for m in ds["messages"] if isinstance(m, list) and m]
    if text_field in columns:
        return [str(t) for t in ds[text_field] if t is not None]
    raise MoePruneError(f"{where}: no '{text_field}' column (columns: {', '.join(columns)}); set "
                        "calibration.text_field to the column that holds the text")


@_READERS.register(".csv")
@_READERS.register(".parquet")
def _read_table(path: Path, *, text_field: str, prefer_messages: bool) -> list[Row]:
    """CSV / Parquet through `datasets.load_dataset(<format>, data_files=<local file>)` (no hub access)."""
    datasets = _datasets()
    fmt = path.suffix.lower()[1:]
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # re-raised as one line naming the file
        raise MoePruneError(f"calibration file {path}: cannot read it as {fmt} ({_first_line(exc)})") from exc
    return _dataset_rows(ds, text_field=text_field, prefer_messages=prefer_messages, where=path)


def _read_saved(path: Path, *, text_field: str, prefer_messages: bool) -> list[Row]:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # re-raised as one line naming the folder
        raise MoePruneError(f"calibration folder {path} is not a datasets save_to_disk folder "
                            f"({_first_line(exc)}); pass a file or a saved dataset") from exc
    return _dataset_rows(ds, text_field=text_field, prefer_messages=prefer_messages, where=path)


def _read_source(name: str, *, text_field: str, prefer_messages: bool) -> list[Row]:
    target = _resolve(name)
    kw = dict(text_field=text_field, prefer_messages=prefer_messages)
    if isinstance(target, list):
        rows = [r for p in target for r in _read_json(p, **kw)]
    elif target.is_dir():
        rows = _read_saved(target, **kw)
    else:
        suffix = target.suffix.lower()
        if suffix not in _READERS:
            raise MoePruneError(f"calibration file {target}: unsupported type {suffix or '(no suffix)'!r}; use "
                                f"{', '.join(_READERS.names())} or a save_to_disk folder")
        rows = _READERS.get(suffix)(target, **kw)
    return [r for r in rows if (r.strip() if isinstance(r, str) else r)]


# -- rows -> token ids ----------------------------------------------------------------------------
def _plain(messages: list) -> str:
    parts = []
    for m in messages:
        content = m.get("content", "") if isinstance(m, dict) else m
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content))
    return "\n".join(parts)


def _render(row: Row, tokenizer, *, chat: bool, source: str) -> str:
    """Chat template on (messages, or text wrapped as one user turn); else plain text."""
    if not chat:
        return row if isinstance(row, str) else _plain(row)
    messages = row if isinstance(row, list) else [{"role": "user", "content": row}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template error on the user's data, re-raised as one line
        raise MoePruneError(f"calibration source {source}: the chat template failed on a row "
                            f"({_first_line(exc)}); check its 'messages' (role/content dicts)") from exc
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text  # BOS is added per sequence below


def _tokenize(texts: list[str], tokenizer, *, truncate_to: int | None) -> list[torch.Tensor]:
    out = []
    kw = dict(truncation=True, max_length=truncate_to) if truncate_to else {}
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        ids = tokenizer(texts[i:i + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False, **kw)["input_ids"]
        out += [torch.tensor(x, dtype=torch.long) for x in ids if len(x)]
    return out


def _sequences(texts: list[str], tokenizer, spec: CalibrationSpec) -> list[torch.Tensor]:
    """Packed: BOS + (texts joined by EOS), cut to exactly max_length (the last may be shorter).
    Unpacked: BOS + one text each, truncated to max_length."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    bos_t = torch.tensor(bos, dtype=torch.long)
    body = spec.max_length - len(bos)
    if not spec.pack:
        return [torch.cat([bos_t, x]) for x in _tokenize(texts, tokenizer, truncate_to=body)]
    eos = tokenizer.eos_token_id
    sep = torch.tensor([eos] if eos is not None else [], dtype=torch.long)
    pieces = _tokenize(texts, tokenizer, truncate_to=None)
    if not pieces:
        return []
    stream = torch.cat([t for x in pieces for t in (x, sep)])  # (T,)
    return [torch.cat([bos_t, chunk]) for chunk in torch.split(stream, body)]


def pad_batches(seqs: list[torch.Tensor], *, pad: int, batch_size: int, width: int | None = None) -> list[dict]:
    """Right-pad each batch to `width` (or its longest row); attention_mask 0 on padding."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        w = width or max(len(s) for s in chunk)
        ids = torch.full((len(chunk), w), pad, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)  # (B, S)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def pad_id(tokenizer) -> int:
    """The token id padding positions hold (masked out; the tokenizer's pad, else its end of sequence, else 0)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


# -- entry point ----------------------------------------------------------------------------------
def _coerce_spec(spec: CalibrationSpec | str | None, max_length: int | None) -> CalibrationSpec:
    if spec is None or isinstance(spec, str):
        return parse_calibration_spec(spec, max_length=512 if max_length is None else max_length)
    if not isinstance(spec, CalibrationSpec):
        raise TypeError(f"calibration spec must be a CalibrationSpec, a string or None; got {type(spec).__name__}")
    return spec if max_length is None else dataclasses.replace(spec, max_length=max_length)


def _draw(spec: CalibrationSpec, tokenizer) -> tuple[list[str], dict[str, int]]:
    """Rows from every source (a seeded shuffle each, then the first N), rendered to text."""
    sources = spec.sources or (CalibrationSource(DEFAULT_SOURCE),)
    texts: list[str] = []
    counts: dict[str, int] = {}
    seen: Counter[str] = Counter()
    for src in sources:
        rows = _read_source(src.name, text_field=spec.text_field, prefer_messages=spec.chat_template)
        # per-source generator: adding or removing one source leaves the others' draws unchanged
        key = f"demo/{src.name}" if src.name in DEMO_DOMAINS else src.name  # aliases draw the same rows
        random.Random(f"{spec.seed}|{key}|{seen[key]}").shuffle(rows)
        seen[key] += 1
        rows = rows[:src.count] if src.count is not None else rows
        counts[src.name] = counts.get(src.name, 0) + len(rows)
        texts += [_render(r, tokenizer, chat=spec.chat_template, source=src.name) for r in rows]
    random.Random(spec.seed).shuffle(texts)  # mix sources, so any prefix of the batches is a mixture too
    return [t for t in texts if t.strip()], counts


def load_calibration(spec: CalibrationSpec | str | None, tokenizer, *, batch_size: int = 8,
                     max_length: int | None = None) -> CalibrationSet:
    """Read, sample, (chat-)format, tokenise and pack/pad the calibration data into batches.

    Args:
        spec: a parsed spec, a `SOURCE[:N],...` string, or None (the built-in demo set).
        tokenizer: a Hugging Face tokenizer; BOS starts each sequence when it has one, EOS separates
            packed texts, padding uses its pad token (EOS when it has none).
        batch_size: sequences per batch.
        max_length: overrides `spec.max_length` when given.
    """
    spec = _coerce_spec(spec, max_length)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MoePruneError(f"calibration batch_size must be a positive integer; got {batch_size!r}")
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        raise MoePruneError("calibration.chat_template is set but the tokenizer has no chat template; turn "
                            "chat_template off or use a model folder whose tokenizer has one")
    texts, counts = _draw(spec, tokenizer)
    names = ", ".join(s.name for s in spec.sources) or DEFAULT_SOURCE
    seqs = _sequences(texts, tokenizer, spec) if texts else []
    if not seqs:
        raise MoePruneError(f"calibration set is empty: no text found in {names} "
                            f"(rows drawn: {sum(counts.values())}); pass a source with text in it")
    batches = pad_batches(seqs, pad=pad_id(tokenizer), batch_size=batch_size,
                       width=spec.max_length if spec.pack else None)
    return CalibrationSet(batches=batches, spec=spec, num_sequences=len(seqs),
                          num_tokens=sum(len(s) for s in seqs), source_counts=counts, used_default=spec.is_default)
