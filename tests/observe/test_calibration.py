import json

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.observe.calibration import (DEMO_CALIB_DIR, DEMO_DOMAINS, CalibrationSource, CalibrationSpec,
                                          load_calibration, parse_calibration_spec)
from moeprune.testing import tiny_tokenizer

_HAVE_DEMO = all((DEMO_CALIB_DIR / f"{d}.jsonl").is_file() for d in DEMO_DOMAINS)
needs_demo = pytest.mark.skipif(not _HAVE_DEMO, reason="demo calib files not shipped yet")
CHAT = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()
    t.chat_template = CHAT
    return t


def _docs(tmp_path, n=30, name="t.txt"):
    f = tmp_path / name
    f.write_text("\n\n".join(f"document number {i} with some words" for i in range(n)))
    return f


def _rows(calib):
    """Every sequence's non-padding ids, in order."""
    return [row[m.bool()].tolist() for b in calib.batches for row, m in zip(b["input_ids"], b["attention_mask"])]


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


# -- spec parsing ---------------------------------------------------------------------------------
@needs_demo
def test_spec_grammar_mixtures_counts_aliases_and_paths(tmp_path):
    f = tmp_path / "dir.v2" / "a:b.txt"  # directories, dots and a colon in the path
    f.parent.mkdir()
    f.write_text("x")
    spec = parse_calibration_spec(f" code:256, arith:128,demo/json,demo:5,{f},{f}:3", max_length=64, seed=5)
    assert [(s.name, s.count) for s in spec.sources] == [("code", 256), ("arith", 128), ("demo/json", None),
                                                         ("demo", 5), (str(f), None), (str(f), 3)]
    assert spec.max_length == 64 and spec.seed == 5
    d = spec.to_dict()
    assert d["sources"][0] == {"name": "code", "count": 256} and json.loads(json.dumps(d)) == d


def test_empty_spec_means_default():
    for s in (None, "", " , "):
        spec = parse_calibration_spec(s)
        assert spec.sources == () and spec.is_default
    assert not parse_calibration_spec(str(DEMO_CALIB_DIR.parent)).is_default


def test_windows_style_path_is_not_split(tmp_path):
    with pytest.raises(MoePruneError, match=r"calibration file C:/x.txt does not exist") as e:
        parse_calibration_spec("C:/x.txt")
    _one_line(e)


def test_spec_dataclasses_validate():
    assert CalibrationSpec([CalibrationSource("code", 2)]).sources == (CalibrationSource("code", 2),)
    with pytest.raises(MoePruneError, match="positive integer"):
        CalibrationSource("code", 0)
    with pytest.raises(MoePruneError, match="at least 2"):
        CalibrationSpec((), max_length=1)


@pytest.mark.parametrize("spec, message", [
    ("demo/poetry", "unknown demo calibration domain 'poetry'; available: arith, code, prose, json, program"),
    ("nowhere.jsonl", "calibration file nowhere.jsonl does not exist"),
    ("code:0", "count after ':' must be a positive integer"),
    ("code:-3", "count after ':' must be a positive integer"),
    ("code:1.5", "count after ':' must be a positive integer"),
    ("code:many", "count after ':' must be a positive integer"),
    ("code:", "count after ':' must be a positive integer"),
])
def test_spec_errors(spec, message):
    with pytest.raises(MoePruneError, match=message) as e:
        parse_calibration_spec(spec)
    _one_line(e)


def test_max_length_too_small(tok):
    with pytest.raises(MoePruneError, match="at least 2") as e:
        parse_calibration_spec("code", max_length=1)
    _one_line(e)
    with pytest.raises(MoePruneError, match="at least 2"):
        load_calibration("code", tok, max_length=1)


# -- file kinds -----------------------------------------------------------------------------------
def test_txt_splits_on_blank_lines(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("first doc\nstill first\n\n  \nsecond\r\n\r\nthird\n\n\n")
    calib = load_calibration(str(f), tok, max_length=64, batch_size=8)
    assert calib.source_counts == {str(f): 3}
    calib = load_calibration(parse_calibration_spec(str(f), pack=False, max_length=64), tok)
    texts = sorted(tok.decode(r[1:]) for r in _rows(calib))
    assert texts == ["first doc\nstill first", "second", "third"]


def test_jsonl_text_field_and_json_array(tmp_path, tok):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(4)) + "\n")
    calib = load_calibration(parse_calibration_spec(f"{f}:3", text_field="body", pack=False, max_length=16), tok)
    assert calib.source_counts == {str(f): 3} and calib.num_sequences == 3
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "one"}, {"text": "two"}, "three"]))
    assert load_calibration(str(arr), tok, max_length=16).source_counts == {str(arr): 3}


def test_messages_with_and_without_chat_template(tmp_path, tok, chat_tok):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n" + json.dumps({"text": "plain"}) + "\n")
    spec = parse_calibration_spec(str(f), chat_template=True, pack=False, max_length=64)
    calib = load_calibration(spec, chat_tok)
    texts = sorted(chat_tok.decode(r) for r in _rows(calib))
    assert texts == ["<s>[user]hi\n[assistant]yo\n", "<s>[user]plain\n"]  # one BOS: the template's is dropped
    plain = load_calibration(parse_calibration_spec(str(f), pack=False, max_length=64), tok)
    assert sorted(tok.decode(r[1:]) for r in _rows(plain)) == ["hi\nyo", "plain"]


def test_chat_template_requested_without_one(tmp_path, tok):
    with pytest.raises(MoePruneError, match="tokenizer has no chat template") as e:
        load_calibration(parse_calibration_spec(str(_docs(tmp_path)), chat_template=True), tok)
    _one_line(e)


def test_csv_parquet_and_saved_dataset(tmp_path, tok):
    import datasets

    csv = tmp_path / "d.csv"
    csv.write_text("text,other\nhello world,1\nsecond row,2\n")
    assert load_calibration(str(csv), tok, max_length=32).source_counts == {str(csv): 2}
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"content": ["p q", "r s", "t"]}).to_parquet(str(pq))
    spec = parse_calibration_spec(f"{pq}:2", text_field="content", max_length=32)
    assert load_calibration(spec, tok).source_counts == {str(pq): 2}
    datasets.Dataset.from_dict({"text": ["a b c", "d e f", "g"]}).save_to_disk(str(tmp_path / "ds"))
    calib = load_calibration(f"{tmp_path / 'ds'}:2", tok, max_length=32)
    assert calib.source_counts == {str(tmp_path / "ds"): 2}
    with pytest.raises(MoePruneError, match=r"no 'body' column \(columns: text\)") as e:
        load_calibration(parse_calibration_spec(str(tmp_path / "ds"), text_field="body"), tok)
    _one_line(e)


def test_unsupported_file_and_plain_folder(tmp_path, tok):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(MoePruneError, match="unsupported type '.xml'"):
        load_calibration(str(tmp_path / "x.xml"), tok)
    (tmp_path / "folder").mkdir()
    with pytest.raises(MoePruneError, match="is not a datasets save_to_disk folder") as e:
        load_calibration(str(tmp_path / "folder"), tok)
    _one_line(e)


# -- packing and padding --------------------------------------------------------------------------
def test_packing_gives_full_sequences_and_masks(tmp_path, tok):
    calib = load_calibration(parse_calibration_spec(str(_docs(tmp_path)), max_length=40), tok, batch_size=4)
    masks = torch.cat([b["attention_mask"] for b in calib.batches])
    ids = torch.cat([b["input_ids"] for b in calib.batches])
    assert ids.dtype == torch.long and masks.dtype == torch.long and ids.shape[1] == 40
    lengths = masks.sum(1).tolist()
    assert all(n == 40 for n in lengths[:-1]) and 0 < lengths[-1] <= 40
    assert calib.num_tokens == sum(lengths) and calib.num_sequences == len(lengths)
    assert (ids[:, 0] == tok.bos_token_id).all()  # BOS first in every sequence
    assert (ids[masks.bool()] == tok.eos_token_id).sum() == 30  # one EOS after each text
    assert (ids[masks == 0] == tok.pad_token_id).all()
    assert (masks[:, 1:] <= masks[:, :-1]).all()  # right padding only
    # nothing lost: the stream reassembles into every document
    stream = [t for r in _rows(calib) for t in r[1:]]
    docs = tok.decode(stream).split("</s>")
    assert sorted(docs[:-1]) == sorted(f"document number {i} with some words" for i in range(30))


def test_unpacked_rows_are_truncated_and_padded(tmp_path, tok):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"body": "ab" * n}) + "\n" for n in (1, 5, 40)))
    calib = load_calibration(parse_calibration_spec(str(f), max_length=20, pack=False, text_field="body"), tok,
                             batch_size=8)
    (batch,) = calib.batches
    assert batch["input_ids"].shape == (3, 20)
    assert sorted(batch["attention_mask"].sum(1).tolist()) == [3, 11, 20]  # BOS + text, truncated to 20
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert calib.num_tokens == 34


def test_padding_falls_back_to_eos(tmp_path):
    t = tiny_tokenizer(with_pad=False)
    f = tmp_path / "t.txt"
    f.write_text("a\n\nlonger text")
    (batch,) = load_calibration(parse_calibration_spec(str(f), pack=False, max_length=32), t).batches
    assert (batch["input_ids"][batch["attention_mask"] == 0] == t.eos_token_id).all()
    assert (batch["attention_mask"] == 0).any()


def test_batch_size(tmp_path, tok):
    calib = load_calibration(parse_calibration_spec(str(_docs(tmp_path)), pack=False, max_length=64), tok,
                             batch_size=7)
    assert [b["input_ids"].shape[0] for b in calib.batches] == [7, 7, 7, 7, 2]
    with pytest.raises(MoePruneError, match="batch_size"):
        load_calibration(str(_docs(tmp_path)), tok, batch_size=0)


# -- determinism ----------------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_other_draw(tmp_path, tok):
    f = _docs(tmp_path, n=50)
    a = load_calibration(parse_calibration_spec(f"{f}:10", seed=1, max_length=32), tok)
    b = load_calibration(parse_calibration_spec(f"{f}:10", seed=1, max_length=32), tok)
    c = load_calibration(parse_calibration_spec(f"{f}:10", seed=2, max_length=32), tok)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
               for x, y in zip(a.batches, b.batches)) and len(a.batches) == len(b.batches)
    drawn = lambda cs: set(tok.decode([t for r in _rows(cs) for t in r]).replace("<s>", "").split("</s>"))  # noqa
    assert drawn(a) != drawn(c)
    assert a.source_counts == {str(f): 10}


def test_sources_are_mixed_and_drawn_independently(tmp_path, tok):
    a, b = _docs(tmp_path, n=20, name="a.txt"), tmp_path / "b.txt"
    b.write_text("\n\n".join(f"other {i}" for i in range(20)))
    only_a = load_calibration(parse_calibration_spec(f"{a}:5", pack=False, max_length=64), tok)
    both = load_calibration(parse_calibration_spec(f"{a}:5,{b}:5", pack=False, max_length=64), tok)
    texts = [tok.decode(r[1:]) for r in _rows(both)]
    assert both.source_counts == {str(a): 5, str(b): 5}
    assert {tok.decode(r[1:]) for r in _rows(only_a)} == {t for t in texts if t.startswith("document")}
    assert [t.startswith("document") for t in texts] != [True] * 5 + [False] * 5  # shuffled together


# -- the built-in set -----------------------------------------------------------------------------
@needs_demo
def test_default_is_the_builtin_mixed_set(tok):
    calib = load_calibration(None, tok, max_length=128)
    assert calib.used_default and calib.source_counts == {"demo": 128 * len(DEMO_DOMAINS)}
    d = calib.describe()
    assert d["used_default"] is True and d["num_tokens"] == calib.num_tokens and json.loads(json.dumps(d)) == d
    explicit = load_calibration("demo:16", tok, max_length=128)
    assert not explicit.used_default and explicit.source_counts == {"demo": 16}


@needs_demo
def test_demo_domain_aliases(tok):
    a = load_calibration("code:4,arith:3", tok, max_length=64)
    b = load_calibration("demo/code:4,demo/arith:3", tok, max_length=64)
    assert a.source_counts == {"code": 4, "arith": 3} and _rows(a) == _rows(b)


# -- errors ---------------------------------------------------------------------------------------
def test_bad_rows_and_empty_sets(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(MoePruneError, match=r"bad.jsonl:2: row has no 'text' field") as e:
        load_calibration(str(f), tok)
    _one_line(e)
    f.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(MoePruneError, match=r"bad.jsonl:2: not valid JSON"):
        load_calibration(str(f), tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(MoePruneError, match="calibration set is empty") as e:
        load_calibration(str(empty), tok)
    _one_line(e)
