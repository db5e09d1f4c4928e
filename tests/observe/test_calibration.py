import json

import pytest

from moeprune.errors import MoePruneError
from moeprune.observe.calibration import DEMO_DOMAINS, load_calibration, parse_calibration_spec
from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_spec_grammar(tmp_path):
    f = tmp_path / "dir.v2" / "a:b.txt"
    f.parent.mkdir()
    f.write_text("x")
    spec = parse_calibration_spec(f"code:256,arith:128,demo/json,{f},{f}:3", max_length=64, seed=5)
    assert [(s.name, s.count) for s in spec.sources] == [("code", 256), ("arith", 128), ("demo/json", None),
                                                         (str(f), None), (str(f), 3)]
    assert spec.max_length == 64 and spec.seed == 5 and spec.to_dict()["sources"][0] == {"name": "code", "count": 256}
    assert [s.name for s in parse_calibration_spec(None).sources] == ["demo"]


@pytest.mark.parametrize("spec, message", [
    ("demo/poetry", "unknown demo calibration domain 'poetry'; available: arith"),
    ("nowhere.jsonl", "calibration file nowhere.jsonl does not exist"),
    ("code:0", "must be a positive integer"),
])
def test_spec_errors(spec, message):
    with pytest.raises(MoePruneError, match=message):
        parse_calibration_spec(spec)


def test_max_length_too_small():
    with pytest.raises(MoePruneError, match="at least 2"):
        parse_calibration_spec("code", max_length=1)


def test_packing_gives_full_sequences_and_masks(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"document number {i} with some words" for i in range(30)))
    calib = load_calibration(parse_calibration_spec(str(f), max_length=40), tok, batch_size=4)
    lengths = [int(m.sum()) for b in calib.batches for m in b["attention_mask"]]
    assert all(n == 40 for n in lengths[:-1]) and 0 < lengths[-1] <= 40
    assert calib.num_tokens == sum(lengths) and calib.num_sequences == len(lengths)
    first = calib.batches[0]["input_ids"][0]
    assert first[0] == tok.bos_token_id and (first == tok.eos_token_id).any()  # BOS, EOS-separated texts
    last = calib.batches[-1]
    assert (last["input_ids"][last["attention_mask"] == 0] == tok.pad_token_id).all()


def test_unpacked_rows_are_truncated_and_padded(tmp_path, tok):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"body": "ab" * n}) + "\n" for n in (1, 5, 40)))
    calib = load_calibration(parse_calibration_spec(str(f), max_length=20, pack=False, text_field="body"), tok,
                             batch_size=8)
    (batch,) = calib.batches
    assert sorted(batch["attention_mask"].sum(1).tolist()) == [3, 11, 20]


def test_seeded_sampling(tok):
    a = load_calibration(parse_calibration_spec("arith:5", seed=1, max_length=64), tok)
    b = load_calibration(parse_calibration_spec("arith:5", seed=1, max_length=64), tok)
    c = load_calibration(parse_calibration_spec("arith:5", seed=2, max_length=64), tok)
    flat = lambda cs: [row.tolist() for batch in cs.batches for row in batch["input_ids"]]  # noqa: E731
    assert flat(a) == flat(b) and flat(a) != flat(c)
    assert a.source_counts == {"arith": 5}


def test_default_is_the_builtin_mixed_set(tok):
    calib = load_calibration(None, tok, max_length=128)
    assert calib.used_default and set(calib.source_counts) == {"demo"}
    assert calib.source_counts["demo"] == 128 * len(DEMO_DOMAINS)
    assert calib.describe()["used_default"] is True


def test_chat_template_and_messages(tmp_path, tok):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n")
    with pytest.raises(MoePruneError, match="has no chat template"):
        load_calibration(parse_calibration_spec(str(f), chat_template=True), tok)
    tok2 = tiny_tokenizer()
    tok2.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    calib = load_calibration(parse_calibration_spec(str(f), chat_template=True, max_length=64), tok2)
    text = tok2.decode(calib.batches[0]["input_ids"][0][calib.batches[0]["attention_mask"][0].bool()])
    assert "[user]hi" in text and "[assistant]yo" in text


def test_csv_and_saved_dataset(tmp_path, tok):
    import datasets

    csv = tmp_path / "d.csv"
    csv.write_text("text,other\nhello world,1\nsecond row,2\n")
    assert load_calibration(parse_calibration_spec(str(csv), max_length=32), tok).source_counts == {str(csv): 2}
    datasets.Dataset.from_dict({"text": ["a b c", "d e f", "g"]}).save_to_disk(str(tmp_path / "ds"))
    calib = load_calibration(parse_calibration_spec(f"{tmp_path / 'ds'}:2", max_length=32), tok)
    assert calib.source_counts == {str(tmp_path / "ds"): 2}


def test_bad_rows_and_empty_sets(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(MoePruneError, match=r"bad.jsonl:2: row has no 'text' field"):
        load_calibration(parse_calibration_spec(str(f)), tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(MoePruneError, match="calibration set is empty"):
        load_calibration(parse_calibration_spec(str(empty)), tok)
