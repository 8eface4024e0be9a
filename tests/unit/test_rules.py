"""Rule rewards (rewardserve.rewards.rules) and the composite manifest section."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from builders import write_manifest
from rewardserve.registry.manifest import ManifestError, load_manifest
from rewardserve.rewards.rules import (
    ExactMatch,
    LengthPenalty,
    RegexCheck,
    normalize_answer,
    response_of,
)
from rewardserve.schemas.scoring import ChatMessage

# ---- length penalty ------------------------------------------------------------------------


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_length_penalty_is_zero_up_to_the_target() -> None:
    rule = LengthPenalty(target=10, per=5)
    assert rule.value("", words(0), None) == 0.0
    assert rule.value("", words(10), None) == 0.0


def test_length_penalty_costs_one_per_step_over_the_target() -> None:
    rule = LengthPenalty(target=10, per=5)
    assert rule.value("", words(11), None) == pytest.approx(-0.2)
    assert rule.value("", words(15), None) == pytest.approx(-1.0)
    assert rule.value("", words(30), None) == pytest.approx(-4.0)


def test_length_penalty_cap_and_chars() -> None:
    assert LengthPenalty(target=10, per=5, cap=1.5).value("", words(30), None) == -1.5
    by_chars = LengthPenalty(target=3, per=2, unit="chars")
    assert by_chars.value("", "abcdefg", None) == pytest.approx(-2.0)  # 7 chars, 4 over


@pytest.mark.parametrize(
    "params", [{}, {"target": -1}, {"target": 5, "per": 0}, {"target": 5, "unit": "tokens"}]
)
def test_length_penalty_bad_params(params: dict) -> None:
    with pytest.raises(ValidationError):
        LengthPenalty.model_validate(params)


# ---- regex ---------------------------------------------------------------------------------


def test_regex_search_match_and_mismatch() -> None:
    rule = RegexCheck(pattern=r"\bANSWER: \d+", match=1.0, mismatch=-1.0)
    assert rule.value("", "so the ANSWER: 42 it is", None) == 1.0
    assert rule.value("", "I think 42", None) == -1.0


def test_regex_fullmatch_and_flags() -> None:
    rule = RegexCheck(pattern=r"yes|no", mode="fullmatch", flags=["ignorecase"])
    assert rule.value("", "  YES \n", None) == 1.0
    assert rule.value("", "yes, sure", None) == 0.0


def test_regex_that_does_not_compile_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RegexCheck(pattern="(unclosed")


# ---- exact match ---------------------------------------------------------------------------


def test_exact_match_with_normalization() -> None:
    rule = ExactMatch()
    assert rule.value("", "  The Answer:  42. ", "the answer: 42") == 1.0
    assert rule.value("", "Paris!", "paris") == 1.0
    assert rule.value("", "forty-two", "42") == 0.0


def test_exact_match_without_normalization_is_exact_but_stripped() -> None:
    rule = ExactMatch(normalize=False)
    assert rule.value("", " Paris\n", "Paris") == 1.0
    assert rule.value("", "paris", "Paris") == 0.0


def test_exact_match_extracts_the_last_answer() -> None:
    rule = ExactMatch(extract=r"####\s*(.+)", match=2.0, mismatch=-1.0)
    assert rule.value("", "3 + 4 = 7\n#### 7", "7") == 2.0
    assert rule.value("", "#### 5\nno wait\n#### 7", "7") == 2.0
    assert rule.value("", "the answer is 7", "7") == -1.0  # no answer found


def test_normalize_answer() -> None:
    assert normalize_answer("  Ｆｏｏ\t BAR?! ") == "foo bar"


# ---- what a rule judges --------------------------------------------------------------------


def test_response_of_each_form() -> None:
    assert response_of("Q?", "A.", None, None) == ("Q?", "A.")
    msgs = [
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="Bye"),
    ]
    assert response_of(None, None, msgs, None) == ("\n\nHuman: Hi", "Hello!")
    assert response_of(None, None, msgs[:1], None) == ("\n\nHuman: Hi", "")
    hh = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: the reply"
    assert response_of(None, None, None, hh) == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        "the reply",
    )
    assert response_of(None, None, None, "no markers") == ("", "no markers")


# ---- the composite section of model.yaml ---------------------------------------------------


def composite(*parts: dict, **fields: object) -> dict:
    return {"name": "mix", "kind": "reward", "composite": {"parts": list(parts)}, **fields}


RM = {"name": "rm", "model": "rm-a"}
GOOD = composite(
    RM | {"weight": 1.0, "use": "raw"},
    {"name": "brevity", "rule": "length_penalty", "weight": 0.2, "params": {"target": 50}},
    {"name": "format", "rule": "regex", "params": {"pattern": "^[A-Z]"}},
    {"name": "correct", "rule": "exact_match", "weight": 2, "params": {"normalize": True}},
)


def test_a_composite_manifest_loads_without_source(tmp_path: Path) -> None:
    write_manifest(tmp_path / "mix", **GOOD)
    m = load_manifest(tmp_path / "mix")
    assert m.source is None and m.composite is not None
    assert m.composite.names == ["rm", "brevity", "format", "correct"]
    assert m.composite.weights({"format": 3.0}) == {
        "rm": 1.0,
        "brevity": 0.2,
        "format": 3.0,
        "correct": 2.0,
    }


SOURCE = {"kind": "repository", "path": "weights"}
BAD = [
    pytest.param({"name": "mix", "kind": "reward"}, "source", "only a composite", id="no source"),
    pytest.param(composite(RM) | {"source": SOURCE}, "source", "no weights", id="both"),
    pytest.param(composite(RM, RM), "composite", "used twice", id="duplicate names"),
    pytest.param(composite(), "composite.parts", "at least 1", id="no parts"),
    pytest.param(
        composite({"name": "x", "model": "rm-a", "rule": "regex"}),
        "composite.parts.0",
        "exactly one of",
        id="model and rule",
    ),
    pytest.param(composite({"name": "x"}), "composite.parts.0", "exactly one", id="neither"),
    pytest.param(
        composite(RM | {"weight": float("nan")}), "composite.parts.0.weight", "finite", id="nan"
    ),
    pytest.param(
        composite(RM | {"weight": float("inf")}), "composite.parts.0.weight", "finite", id="inf"
    ),
    pytest.param(
        composite({"name": "f", "rule": "regex", "params": {"pattern": "(x"}}),
        "composite.parts.0",
        "params.pattern",
        id="bad regex",
    ),
    pytest.param(
        composite({"name": "b", "rule": "length_penalty", "params": {}}),
        "composite.parts.0",
        "params.target",
        id="no target",
    ),
    pytest.param(
        composite({"name": "b", "rule": "length_penalty", "params": {"target": 5, "x": 1}}),
        "composite.parts.0",
        "params.x",
        id="unknown param",
    ),
    pytest.param(
        composite({"name": "c", "rule": "exact_match", "use": "raw"}),
        "composite.parts.0",
        "'use' is for model parts",
        id="use on a rule",
    ),
    pytest.param(
        composite(RM | {"params": {"target": 3}}),
        "composite.parts.0",
        "'params' are for rule parts",
        id="params on a model",
    ),
    pytest.param(
        composite({"name": "c", "rule": "bleu"}), "composite.parts.0.rule", "", id="unknown rule"
    ),
    pytest.param(composite(RM, kind="policy"), "composite", "kind: reward only", id="on a policy"),
]


@pytest.mark.parametrize(("raw", "field", "says"), BAD)
def test_bad_composite_manifest_names_the_field(
    tmp_path: Path, raw: dict, field: str, says: str
) -> None:
    write_manifest(tmp_path / "mix", **raw)
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "mix")
    assert e.value.field == field, str(e.value)
    assert says in str(e.value)
