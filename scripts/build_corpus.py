#!/usr/bin/env python
"""Build the multi-domain demo corpus, fully offline and reproducibly.

Domains (names are a contract used by the evaluation stage):
  arith    procedural arithmetic with column-wise step-by-step answers ending in "#### N"
  code     Python stdlib source (tests excluded), chunked at line boundaries
  prose    English prose: the Python documentation reST sources (Debian python3.11-doc)
           when installed; otherwise stdlib docstrings + /usr/share/common-licenses texts
  json     structured extraction: sentence -> one-line JSON object
  program  tiny Python programs followed by "# output: <first printed line>"

Outputs
  data/corpus/<domain>/{train,heldout,calib}.jsonl    rows {"text": ...} (not committed)
  data/corpus/manifest.json                           counts and sources
  moeprune/assets/demo-corpus/eval/<domain>.jsonl     200 {"prompt","answer"} rows for
                                                      arith/json/program, 100 {"text"} rows
                                                      for code/prose
  moeprune/assets/demo-corpus/calib/<domain>.jsonl    128 {"text"} rows per domain

Splits never overlap: generative domains are deduplicated by prompt (held-out and calib
prompts are excluded from train); code/prose are split by source document (hash of the
file path), so no chunk of a held-out document is ever trained on.

Usage: python scripts/build_corpus.py [--out data/corpus] [--assets moeprune/assets/demo-corpus]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import os
import random
import re
import sysconfig
from pathlib import Path

DOMAINS = ["arith", "code", "prose", "json", "program"]
GENERATIVE = ["arith", "json", "program"]
MAX_CHARS = 1500
N_EVAL_GEN = 200
N_EVAL_TEXT = 100
N_CALIB = 128

# --------------------------------------------------------------------------- arith


def _add_steps(a: int, b: int) -> tuple[str, int]:
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    carry, steps, digits = 0, [], []
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        digits.append(s % 10)
        carry = s // 10
    if carry:
        digits.append(carry)
    return ", ".join(steps), a + b


def _sub_steps(a: int, b: int) -> tuple[str, int]:
    # a >= b
    da, db = str(a)[::-1], str(b)[::-1]
    borrow, steps = 0, []
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        d = x - y - borrow
        nb = 1 if d < 0 else 0
        d += 10 * nb
        steps.append(f"{x}-{y}-{borrow}={d}" + (" b1" if nb else ""))
        borrow = nb
    return ", ".join(steps), a - b


def _mul_steps(a: int, b: int) -> tuple[str, int]:
    # a multi-digit, b single digit
    da = str(a)[::-1]
    carry, steps = 0, []
    for ch in da:
        x = int(ch)
        p = x * b + carry
        steps.append(f"{x}*{b}+{carry}={p}")
        carry = p // 10
    return ", ".join(steps), a * b


NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
    "Karen", "Liam", "Maria", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tina",
    "Umar", "Vera", "Walter", "Xena", "Yusuf", "Zoe", "Aaron", "Bella", "Carlos", "Diana",
    "Ethan", "Fiona", "George", "Hannah", "Ivan", "Julia", "Kevin", "Laura", "Marco", "Nina",
    "Oscar", "Priya", "Rafael", "Sara", "Tom", "Ursula", "Victor", "Wendy", "Yara", "Zack",
    "Amir", "Beatrice", "Chen", "Dmitri", "Elena", "Farah", "Gustav", "Hiro", "Ines", "Jonas",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Pia", "Ravi", "Sofia", "Theo", "Uma",
]
CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Lisbon",
    "Dublin", "Athens", "Warsaw", "Zurich", "Tokyo", "Seoul", "Lima", "Cairo", "Nairobi",
    "Toronto", "Boston", "Denver", "Austin", "Sydney", "Perth", "Mumbai", "Delhi", "Hanoi",
    "Manila", "Bogota", "Quito", "Havana", "Dakar", "Accra", "Tunis", "Riga", "Tallinn",
    "Helsinki", "Bergen", "Porto", "Seville", "Milan", "Naples", "Munich", "Hamburg",
    "Geneva", "Lyon", "Nice", "Leeds", "Glasgow", "Cardiff", "Chicago", "Seattle",
]
ITEMS = [
    "apple", "pencil", "book", "lamp", "chair", "cup", "plate", "shirt", "hat", "candle",
    "notebook", "bottle", "ticket", "sticker", "marble", "cookie", "orange", "brush",
    "battery", "cable", "spoon", "towel", "basket", "ribbon", "button", "card", "map",
    "kite", "puzzle", "balloon", "pillow", "blanket", "jar", "mug", "glove", "sock",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

WORD_ADD = [
    "{n} has {a} {it}s and buys {b} more. How many {it}s does {n} have now?",
    "A shop sold {a} {it}s in the morning and {b} in the afternoon. How many {it}s were sold?",
    "{n} walked {a} meters and then {b} meters. How many meters in total?",
]
WORD_SUB = [
    "{n} has {a} {it}s and gives away {b}. How many {it}s are left?",
    "A box holds {a} {it}s. {n} takes out {b}. How many {it}s remain?",
]
WORD_MUL = [
    "{n} buys {b} bags with {a} {it}s each. How many {it}s is that?",
    "Each box has {a} {it}s. How many {it}s are in {b} boxes?",
]


def gen_arith(rng: random.Random) -> tuple[str, str, str]:
    """Return (prompt, completion, answer)."""
    kind = rng.choices(["add", "sub", "mul", "wadd", "wsub", "wmul"], [30, 25, 20, 9, 8, 8])[0]

    def num():
        return rng.randint(10, 999) if rng.random() < 0.85 else rng.randint(0, 9)

    if kind in ("add", "wadd"):
        a, b = num(), num()
        steps, res = _add_steps(a, b)
        q = f"{a}+{b}=?" if kind == "add" else rng.choice(WORD_ADD).format(
            n=rng.choice(NAMES), it=rng.choice(ITEMS), a=a, b=b)
    elif kind in ("sub", "wsub"):
        a, b = num(), num()
        if a < b:
            a, b = b, a
        steps, res = _sub_steps(a, b)
        q = f"{a}-{b}=?" if kind == "sub" else rng.choice(WORD_SUB).format(
            n=rng.choice(NAMES), it=rng.choice(ITEMS), a=a, b=b)
    else:
        a = rng.randint(10, 999) if rng.random() < 0.8 else rng.randint(2, 9)
        b = rng.randint(2, 9)
        steps, res = _mul_steps(a, b)
        q = f"{a}*{b}=?" if kind == "mul" else rng.choice(WORD_MUL).format(
            n=rng.choice(NAMES), it=rng.choice(ITEMS), a=a, b=b)
    prompt = f"Q: {q}\nA: "
    completion = f"{steps}. #### {res}"
    return prompt, completion, str(res)


# --------------------------------------------------------------------------- json

PERSON_T = [
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, is from {city}.",
    "In {city} lives {name}, who is {age}.",
    "{name} moved to {city} at the age of {age}.",
    "Meet {name}: {age} years old, based in {city}.",
]
ORDER_T = [
    "I bought {qty} x {item} for {price} dollars.",
    "Order: {qty} x {item}, total {price} dollars.",
    "The {item} costs {price} dollars and I need {qty}.",
    "Please send {qty} units of {item} at {price} dollars.",
]
BOOK_T = [
    "{name} booked a table for {guests} on {day}.",
    "On {day}, {name} reserved seats for {guests} people.",
    "Reservation by {name}: {guests} guests, {day}.",
]


def gen_json(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(["person", "order", "book"])
    if kind == "person":
        d = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
        s = rng.choice(PERSON_T).format(**d)
    elif kind == "order":
        d = {"item": rng.choice(ITEMS), "quantity": rng.randint(1, 20), "price": rng.randint(1, 500)}
        s = rng.choice(ORDER_T).format(item=d["item"], qty=d["quantity"], price=d["price"])
    else:
        d = {"name": rng.choice(NAMES), "guests": rng.randint(1, 12), "day": rng.choice(DAYS)}
        s = rng.choice(BOOK_T).format(**d)
    prompt = f"Extract the fields from: {s}\n"
    ans = json.dumps(d)
    return prompt, ans, ans


# --------------------------------------------------------------------------- program

WORDS = ["cat", "dog", "sun", "tree", "moon", "fish", "bird", "rain", "star", "leaf",
         "code", "data", "byte", "list", "loop", "node", "path", "test", "word", "lamp"]
VARS = ["x", "y", "z", "a", "b", "n", "m", "k", "v", "t"]


def _program_source(rng: random.Random) -> str:
    k = rng.randint(0, 9)
    v1, v2 = rng.sample(VARS, 2)
    if k == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        op = rng.choice(["+", "-"])
        return f"{v1} = {a}\n{v2} = {b}\nprint({v1} {op} {v2})"
    if k == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{v1} = {a}\nprint({v1} * {b})"
    if k == 2:
        w = rng.choice(WORDS)
        expr = rng.choice(["{s}.upper()", "{s}[::-1]", "len({s})", "{s} * 2",
                           "{s} + '!'", "{s}[0]", "{s}[-1]", "{s}.capitalize()"])
        return f"s = '{w}'\nprint({expr.format(s='s')})"
    if k == 3:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        expr = rng.choice(["xs[{i}]", "xs[-1]", "max(xs)", "min(xs)", "len(xs)",
                           "sorted(xs)", "xs[::-1]", "xs[0]"])
        return f"xs = {xs}\nprint({expr.format(i=rng.randrange(len(xs)))})"
    if k == 4:
        a, b = rng.randint(0, 20), rng.randint(1, 9)
        op = rng.choice(["+", "-"])
        return f"{v1} = {a}\n{v1} = {v1} {op} {b}\nprint({v1})"
    if k == 5:
        return f"print(list(range({rng.randint(0, 6)})))"
    if k == 6:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        w1, w2 = rng.sample(["big", "small", "yes", "no", "hot", "cold", "up", "down"], 2)
        cmp = rng.choice([">", "<", "=="])
        return (f"{v1} = {a}\nif {v1} {cmp} {b}:\n    print('{w1}')\nelse:\n    print('{w2}')")
    if k == 7:
        keys = rng.sample(["a", "b", "c", "d", "e"], 3)
        d = {kk: rng.randint(0, 30) for kk in keys}
        return f"d = {d}\nprint(d['{rng.choice(keys)}'])"
    if k == 8:
        a, b, c = rng.randint(0, 9), rng.randint(2, 4), rng.randint(0, 9)
        return f"{v1} = {a}\n{v2} = {v1} * {b}\nprint({v2} + {c})"
    total = rng.randint(1, 5)
    return (f"{v1} = 0\nfor i in range({total}):\n    {v1} = {v1} + {rng.randint(1, 3)}\nprint({v1})")


def _run_program(src: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(src, "<generated>", "exec"), {"__builtins__": {
            "print": print, "len": len, "max": max, "min": min, "sorted": sorted,
            "list": list, "range": range}})
    return buf.getvalue().split("\n")[0]


def gen_program(rng: random.Random) -> tuple[str, str, str]:
    src = _program_source(rng)
    out = _run_program(src)
    prompt = f"{src}\n# output: "
    return prompt, out, out


GENERATORS = {"arith": gen_arith, "json": gen_json, "program": gen_program}

# --------------------------------------------------------------------------- text domains


def _split_of(key: str, held: int = 5, calib: int = 4) -> str:
    """Document-level split by hash: `held`% heldout, `calib`% calib, rest train."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if h < held else "calib" if h < held + calib else "train"


def _chunk_lines(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if len(line) > max_chars:
            line = line[:max_chars - 1] + "\n"
        if n + len(line) > max_chars and cur:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return [c for c in out if len(c.strip()) >= 200]


EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3",
                "tkinter", "turtledemo", "ensurepip", "config-3.11-x86_64-linux-gnu"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("test_"):
                files.append(Path(dirpath) / f)
    return files, root


def build_code() -> tuple[dict, str]:
    files, root = stdlib_files()
    splits = {"train": [], "heldout": [], "calib": []}
    for p in files:
        rel = str(p.relative_to(root))
        text = p.read_bytes().decode("utf-8", errors="replace")
        for c in _chunk_lines(text):
            splits[_split_of(rel)].append(c)
    return splits, f"Python stdlib source under {root} ({len(files)} files, tests excluded)"


_ROLE = re.compile(r":[a-zA-Z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def _clean_rst(text: str) -> str:
    paras, out = re.split(r"\n\s*\n", text), []
    for p in paras:
        lines = p.split("\n")
        if not lines or lines[0].startswith((" ", "\t", "..", "|", "+", "=", "*", "-", "#")):
            continue
        if any(re.fullmatch(r"[=\-~^*#\"']{3,}", ln.strip()) for ln in lines):
            continue
        s = " ".join(ln.strip() for ln in lines)
        s = _ROLE.sub(r"\1", s)
        s = _LINK.sub(r"\1", s)
        s = s.replace("``", "").replace("**", "")
        s = s.rstrip(":") + ("." if s.endswith("::") else "")
        letters = sum(ch.isalpha() or ch == " " for ch in s)
        if len(s) < 80 or letters / len(s) < 0.8:
            continue
        out.append(s)
    return "\n\n".join(out)


def _para_chunks(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    out, cur = [], ""
    for p in text.split("\n\n"):
        p = p[:max_chars]
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= 200]


def build_prose() -> tuple[dict, str]:
    splits = {"train": [], "heldout": [], "calib": []}
    doc_root = Path("/usr/share/doc/python3.11/html/_sources")
    docs = sorted(doc_root.rglob("*.txt")) if doc_root.is_dir() else []
    if docs:
        for p in docs:
            rel = str(p.relative_to(doc_root))
            text = _clean_rst(p.read_bytes().decode("utf-8", errors="replace"))
            for c in _para_chunks(text):
                splits[_split_of(rel, 7, 10)].append(c)
        return splits, f"Debian python3.11-doc reST sources under {doc_root} ({len(docs)} files)"
    # fallback: module/class/function docstrings of the stdlib + license texts
    files, root = stdlib_files()
    for p in files:
        rel = str(p.relative_to(root))
        try:
            tree = ast.parse(p.read_bytes().decode("utf-8", errors="replace"))
        except SyntaxError:
            continue
        ds = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d:
                    ds.append(d)
        text = "\n\n".join(" ".join(x.split()) for x in "\n\n".join(ds).split("\n\n")
                           if len(x) >= 80 and not x.lstrip().startswith(">>>"))
        for c in _para_chunks(text):
            splits[_split_of("doc:" + rel, 7, 10)].append(c)
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        for p in sorted(lic.iterdir()):
            if p.is_file():
                text = "\n\n".join(" ".join(x.split()) for x in re.split(r"\n\s*\n", p.read_text(errors="replace")))
                for c in _para_chunks(text):
                    splits[_split_of("lic:" + p.name, 7, 10)].append(c)
    return splits, "FALLBACK (python3.11-doc absent): stdlib docstrings + /usr/share/common-licenses"


# --------------------------------------------------------------------------- main


def build_generative(domain: str, n_train: int, n_heldout: int, n_calib: int, seed: int):
    gen = GENERATORS[domain]
    rng = random.Random(f"{seed}-{domain}")
    seen: set[str] = set()
    held, calib, train = [], [], []
    while len(held) < n_heldout:
        p, c, a = gen(rng)
        if p not in seen:
            seen.add(p)
            held.append((p, c, a))
    while len(calib) < n_calib:
        p, c, a = gen(rng)
        if p not in seen:
            seen.add(p)
            calib.append((p, c, a))
    reserved = set(seen)
    tries = 0
    while len(train) < n_train and tries < n_train * 20:
        tries += 1
        p, c, a = gen(rng)
        if p not in reserved:
            train.append((p, c, a))  # duplicates inside train are allowed (small spaces)
    return {"train": train, "heldout": held, "calib": calib}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--assets", default="moeprune/assets/demo-corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-train-gen", type=int, default=200_000,
                    help="training examples per generative domain")
    args = ap.parse_args()
    out, assets = Path(args.out), Path(args.assets)
    manifest = {"seed": args.seed, "domains": {}}

    for d in GENERATIVE:
        sp = build_generative(d, args.n_train_gen, 2000, 1000, args.seed)
        for split, rows in sp.items():
            write_jsonl(out / d / f"{split}.jsonl",
                        [{"text": p + c, "prompt": p, "answer": a} for p, c, a in rows])
        write_jsonl(assets / "eval" / f"{d}.jsonl",
                    [{"prompt": p, "answer": a} for p, c, a in sp["heldout"][:N_EVAL_GEN]])
        write_jsonl(assets / "calib" / f"{d}.jsonl",
                    [{"text": p + c} for p, c, a in sp["calib"][:N_CALIB]])
        manifest["domains"][d] = {"source": "procedural generator in scripts/build_corpus.py",
                                  **{k: len(v) for k, v in sp.items()}}
        print(f"{d}: " + ", ".join(f"{k}={len(v)}" for k, v in sp.items()))

    for d, fn in (("code", build_code), ("prose", build_prose)):
        sp, source = fn()
        rng = random.Random(f"{args.seed}-{d}")
        for split in sp:
            rng.shuffle(sp[split])
        for split, rows in sp.items():
            write_jsonl(out / d / f"{split}.jsonl", [{"text": t} for t in rows])
        write_jsonl(assets / "eval" / f"{d}.jsonl", [{"text": t} for t in sp["heldout"][:N_EVAL_TEXT]])
        write_jsonl(assets / "calib" / f"{d}.jsonl", [{"text": t} for t in sp["calib"][:N_CALIB]])
        chars = {k: sum(map(len, v)) for k, v in sp.items()}
        manifest["domains"][d] = {"source": source, **{k: len(v) for k, v in sp.items()},
                                  "chars": chars}
        print(f"{d}: source = {source}; " + ", ".join(f"{k}={len(v)} chunks/{chars[k]} chars"
                                                       for k, v in sp.items()))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out} and {assets}")


if __name__ == "__main__":
    main()
