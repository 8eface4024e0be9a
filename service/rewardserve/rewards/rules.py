"""Rule rewards: parts of a composite reward computed from the text alone, with no model.

Each rule is a pydantic model of its parameters (the `params:` of a part in model.yaml,
validated when the manifest loads) with one method, `value(prompt, response, label)`. Rules
judge the response; `response_of` finds it in a score item of any form.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from rewardserve.engine.inputs import render_hh

Finite = Annotated[float, Field(allow_inf_nan=False)]
HH_ASSISTANT = "\n\nAssistant:"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthPenalty(_Params):
    """The classic guard against verbosity hacking: 0 up to `target`, then −1 for every
    `per` units beyond it, never below −`cap`.

    value = −min(cap, max(0, length − target) / per)
    """

    target: int = Field(ge=0)
    """Longest response that costs nothing, in `unit`s."""
    unit: Literal["words", "chars"] = "words"
    """words: white-space separated words (a tokenizer-free stand-in for tokens, so the
    penalty is the same whichever models the composite holds); chars: characters."""
    per: float = Field(100.0, gt=0, allow_inf_nan=False)
    """Units over `target` that cost 1.0 (the slope's inverse)."""
    cap: float | None = Field(None, gt=0, allow_inf_nan=False)
    """The largest penalty: the value never goes below −cap (None: unbounded)."""

    def length(self, response: str) -> int:
        return len(response.split()) if self.unit == "words" else len(response)

    def value(self, prompt: str, response: str, label: str | None) -> float:
        over = max(0, self.length(response) - self.target) / self.per
        if self.cap is not None:
            over = min(self.cap, over)
        return -over if over else 0.0  # never -0.0 on the wire


_FLAGS = {"ignorecase": re.IGNORECASE, "multiline": re.MULTILINE, "dotall": re.DOTALL}


def _compiled(pattern: str, flags: list[str]) -> re.Pattern[str]:
    bits = 0
    for f in flags:
        bits |= _FLAGS[f]
    return re.compile(pattern, bits)


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
    return pattern


class RegexCheck(_Params):
    """A format check: `match` when the response matches `pattern`, else `mismatch`."""

    pattern: str = Field(min_length=1)
    """A Python regular expression (compiled when the manifest loads)."""
    mode: Literal["search", "fullmatch"] = "search"
    """search: anywhere in the response; fullmatch: the whole response, surrounding white
    space ignored."""
    flags: list[Literal["ignorecase", "multiline", "dotall"]] = []
    match: Finite = 1.0
    """Value of a response that matches."""
    mismatch: Finite = 0.0
    """Value of one that does not."""
    _regex: re.Pattern[str] = PrivateAttr()

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        return _compiles(v)

    def model_post_init(self, context: Any) -> None:
        self._regex = _compiled(self.pattern, list(self.flags))

    def value(self, prompt: str, response: str, label: str | None) -> float:
        if self.mode == "fullmatch":
            hit = self._regex.fullmatch(response.strip())
        else:
            hit = self._regex.search(response)
        return self.match if hit else self.mismatch


def normalize_answer(s: str) -> str:
    """Unicode NFKC, case-folded, white space runs collapsed to one space, and white space
    and the punctuation .,;:!? stripped from both ends: "  The Answer: 42. " and
    "the answer: 42" compare equal, "42" and "forty-two" do not."""
    s = " ".join(unicodedata.normalize("NFKC", s).casefold().split())
    return s.strip(" .,;:!?")


class ExactMatch(_Params):
    """Correctness against the item's reference `label`: `match` when the answer equals it,
    else `mismatch`. Every item scored by a composite with this part needs a label."""

    normalize: bool = True
    """Compare normalize_answer() of both sides (else the exact strings)."""
    extract: str | None = None
    """A regular expression that finds the answer in the response: the last match's group
    1 (the whole match when it has no group), e.g. '####\\s*(.+)' or '\\\\boxed\\{(.+?)\\}'.
    No match: `mismatch`. None: the whole response is the answer."""
    match: Finite = 1.0
    mismatch: Finite = 0.0
    _extract: re.Pattern[str] | None = PrivateAttr(None)

    @field_validator("extract")
    @classmethod
    def _check_extract(cls, v: str | None) -> str | None:
        return None if v is None else _compiles(v)

    def model_post_init(self, context: Any) -> None:
        self._extract = None if self.extract is None else re.compile(self.extract)

    def answer(self, response: str) -> str | None:
        if self._extract is None:
            return response
        hits = list(self._extract.finditer(response))
        if not hits:
            return None
        last = hits[-1]
        return last.group(1) if last.re.groups else last.group(0)

    def value(self, prompt: str, response: str, label: str | None) -> float:
        assert label is not None, "the composite scorer checks labels before scoring"
        answer = self.answer(response)
        if answer is None:
            return self.mismatch
        if self.normalize:
            answer, label = normalize_answer(answer), normalize_answer(label)
        else:
            answer = answer.strip()
        return self.match if answer == label else self.mismatch


class Rule(Protocol):
    def value(self, prompt: str, response: str, label: str | None) -> float: ...


RuleName = Literal["length_penalty", "regex", "exact_match"]
RULES: dict[str, type[_Params]] = {
    "length_penalty": LengthPenalty,
    "regex": RegexCheck,
    "exact_match": ExactMatch,
}
NEEDS_LABEL = frozenset({"exact_match"})


def response_of(
    prompt: str | None, response: str | None, messages: list[Any] | None, text: str | None
) -> tuple[str, str]:
    """(prompt, response) of a score item for the rules to judge.

    prompt+response: as given. messages: the response is the last assistant message, the
    prompt the messages before it as HH text. text: split at the last "\\n\\nAssistant:"
    (HH-RLHF text), one space after it dropped; a text without it is all response. A
    conversation with no assistant message has an empty response (a rule judges it as such).
    """
    if response is not None:
        return prompt or "", response
    if messages is not None:
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].role == "assistant":
                return render_hh(messages[:i]), messages[i].content
        return render_hh(messages), ""
    assert text is not None
    head, sep, tail = text.rpartition(HH_ASSISTANT)
    if not sep:
        return "", text
    return head + sep, tail.removeprefix(" ")
