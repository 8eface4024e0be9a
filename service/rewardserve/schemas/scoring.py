"""Score requests and results."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

NonEmpty = Field(min_length=1)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: StrictStr = NonEmpty


class ScoreItem(BaseModel):
    """One thing to score, in exactly one of three forms."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | None = None
    """With `response`: the conversation so far (may be empty)."""
    response: StrictStr | None = Field(None, min_length=1)
    """With `prompt`: the reply to judge."""
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    """A chat, rendered with the model's chat template (or as HH text)."""
    text: StrictStr | None = Field(None, min_length=1)
    """Raw text, scored as it is."""
    label: StrictStr | None = Field(None, min_length=1)
    """Reference answer, for a composite reward's exact_match parts (ignored otherwise)."""

    @model_validator(mode="after")
    def _one_form(self) -> ScoreItem:
        forms = [self.response is not None, self.messages is not None, self.text is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: prompt+response, messages, text")
        if self.response is not None and self.prompt is None:
            raise ValueError("'response' needs 'prompt' (use '' for none)")
        if self.prompt is not None and self.response is None:
            raise ValueError("'prompt' needs 'response'")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    """Reward model name (GET /v1/models); the default one when absent."""
    items: list[ScoreItem] = Field(min_length=1)
    weights: dict[StrictStr, FiniteFloat] | None = None
    """A composite reward's part weights for this request, by part name; parts not named keep
    the manifest's weight. Refused for a model that is not a composite."""


class ScoreResult(BaseModel):
    index: int
    reward: float
    """Raw model output; an ensemble's: the mean of its members' normalized rewards, or of
    their raw ones (manifest ensemble.combine: raw)."""
    normalized_reward: float
    """(reward - mean) / std with the model's reward statistics; an ensemble's: the mean of
    its members' normalized rewards."""
    uncertainty: float | None = None
    """Ensembles: the (population) standard deviation of the members' normalized rewards;
    null for a single model."""
    members: list[float] | None = None
    """Ensembles: each member's normalized reward, in manifest order; null for a single
    model."""
    truncated: bool
    """The input was longer than the model's max_length; its start was cut."""
    tokens: int
    parts: dict[str, float] | None = None
    """A composite reward's part values, each before weighting (its `reward` and
    `normalized_reward` are both the weighted total); None for a plain model."""


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreResult]
    usage: Usage
