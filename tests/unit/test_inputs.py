"""Input encoding with the real all-MiniLM (BERT WordPiece) tokenizer, plus text rendering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from builders import minilm_dir
from rewardserve.engine.inputs import Encoded, TextEncoder, encode_texts, join_pair, render_hh
from rewardserve.training.reward.data import load_pairs

WORDS = ["red", "blue", "green", "cat", "dog", "house", "tree", "river", "stone", "cloud"]
CLS, SEP = 101, 102
HH_PAIRS = Path(__file__).resolve().parents[3] / "shared/data/hh-harmless/pairs.jsonl.gz"


def words(n: int, offset: int = 0) -> str:
    return " ".join(f"{WORDS[(i + offset) % len(WORDS)]}" for i in range(n))


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(minilm_dir())
    t.truncation_side = "left"
    t.model_max_length = 10**9
    return t


def full_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True, truncation=False)["input_ids"]


def test_short_text_is_not_truncated(tok) -> None:
    (e,) = encode_texts(tok, ["red blue green"], max_length=16)
    assert isinstance(e, Encoded)
    assert e.truncated is False
    assert e.input_ids == full_ids(tok, "red blue green")
    assert e.input_ids[0] == CLS and e.input_ids[-1] == SEP
    assert len(e) == 5


def test_text_of_exactly_max_length_is_not_truncated(tok) -> None:
    text = words(8)
    assert len(full_ids(tok, text)) == 10
    (e,) = encode_texts(tok, [text], max_length=10)
    assert e.truncated is False
    assert len(e) == 10


def test_left_truncation_keeps_the_end_and_special_tokens(tok) -> None:
    text = "START " + words(60) + " finale"
    full = full_ids(tok, text)
    assert len(full) > 20
    (e,) = encode_texts(tok, [text], max_length=20)
    assert e.truncated is True
    assert len(e) == 20
    assert e.input_ids[0] == CLS and e.input_ids[-1] == SEP
    # exactly the last 18 content tokens of the untruncated encoding
    assert e.input_ids[1:-1] == full[1:-1][-18:]
    decoded = tok.decode(e.input_ids, skip_special_tokens=True)
    assert decoded.endswith("finale")
    assert "start" not in decoded


def test_right_truncation_keeps_the_start(tok) -> None:
    t = AutoTokenizer.from_pretrained(minilm_dir())
    t.truncation_side = "right"
    t.model_max_length = 10**9
    text = "opening " + words(60) + " finale"
    (e,) = encode_texts(t, [text], max_length=12)
    assert e.truncated and len(e) == 12
    assert e.input_ids[0] == CLS and e.input_ids[-1] == SEP
    assert e.input_ids[1:-1] == full_ids(t, text)[1:11]


def test_batch_flags_only_the_long_items(tok) -> None:
    texts = ["red", words(100), "blue green", words(9, offset=3), words(30)]
    encoded = encode_texts(tok, texts, max_length=12)
    assert [e.truncated for e in encoded] == [False, True, False, False, True]
    assert [len(e) for e in encoded] == [3, 12, 4, 11, 12]
    for text, e in zip(texts, encoded, strict=True):
        if not e.truncated:
            assert e.input_ids == full_ids(tok, text)  # untouched items are not re-tokenized
        else:
            assert e.input_ids[1:-1] == full_ids(tok, text)[1:-1][-10:]


def test_encoding_does_not_leave_the_tokenizer_truncating(tok) -> None:
    encode_texts(tok, [words(100)], max_length=12)
    (e,) = encode_texts(tok, [words(40)], max_length=100)
    assert not e.truncated and len(e) == 42


def test_padding_or_truncation_saved_in_the_tokenizer_file_is_ignored(tok) -> None:
    """A tokenizer.json may carry padding/truncation settings; the wrapper resets them per
    call, so the encoder must not inherit them either (a short text stays short)."""
    t = AutoTokenizer.from_pretrained(minilm_dir())
    t.truncation_side = "left"
    t.backend_tokenizer.enable_padding(length=64)
    t.backend_tokenizer.enable_truncation(max_length=5)
    (e,) = TextEncoder(t, max_length=32)(["red blue green"])
    assert e.input_ids == full_ids(tok, "red blue green") and not e.truncated


def test_fast_path_matches_the_tokenizers_own_truncation_on_hh_texts(tok) -> None:
    """The Rust-backend path gives exactly what the tokenizer's own truncation gives."""
    texts = [p.chosen for p in load_pairs(HH_PAIRS)[:300]]
    ours = TextEncoder(tok, max_length=128)(texts)
    theirs = tok(texts, truncation=True, max_length=128)["input_ids"]
    assert [e.input_ids for e in ours] == theirs
    assert [e.truncated for e in ours] == [len(full_ids(tok, t)) > 128 for t in texts]
    assert any(e.truncated for e in ours) and not all(e.truncated for e in ours)


def test_slow_path_gives_the_same_encodings(tok) -> None:
    texts = ["red", words(100), "blue green", words(30)]
    slow = TextEncoder(tok, max_length=12)
    slow.backend = None  # as for a tokenizer without a Rust backend
    assert slow(texts) == TextEncoder(tok, max_length=12)(texts)


# ---- rendering ---------------------------------------------------------------------------


@dataclass
class Msg:
    role: str
    content: str


def test_render_hh() -> None:
    msgs = [Msg("system", "be nice"), Msg("user", "hi"), Msg("assistant", "hello!")]
    assert render_hh(msgs) == "\n\nSystem: be nice\n\nHuman: hi\n\nAssistant: hello!"


def test_render_hh_human_alias_and_unknown_role() -> None:
    assert render_hh([Msg("human", "a"), Msg("tool", "b")]) == "\n\nHuman: a\n\nTool: b"


def test_join_pair_hh_prompt_gets_one_space() -> None:
    prompt = "\n\nHuman: what is 2+2?\n\nAssistant:"
    assert join_pair(prompt, "4") == prompt + " 4"
    assert join_pair(prompt + "  \n", "   4") == prompt + " 4"


def test_join_pair_hh_matches_render_hh() -> None:
    prompt = render_hh([Msg("user", "hi")]) + "\n\nAssistant:"
    assert join_pair(prompt, "hello") == render_hh([Msg("user", "hi"), Msg("assistant", "hello")])


def test_join_pair_other_prompts_use_a_newline() -> None:
    assert join_pair("Question: why?", "Because.") == "Question: why?\nBecause."


def test_join_pair_empty_prompt_is_the_response() -> None:
    assert join_pair("", "just this") == "just this"
