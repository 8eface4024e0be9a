"""Payloads of the frameworks that call a remote reward model, exactly as they send them.

Unknown fields are ignored here (not refused): these clients add fields across versions.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator


class OpenRLHFRequest(BaseModel):
    """OpenRLHF `--remote_rm_url`: full texts (prompt + response, already templated)."""

    model_config = ConfigDict(extra="ignore")
    query: list[StrictStr] = Field(min_length=1)
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = {}


def sigmoid(x: float) -> float:
    """Logistic function that cannot overflow: exp() only ever sees a non-positive number."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class _TextsRequest(BaseModel):
    """`model` and `input` as vLLM's and SGLang's pooling APIs take them."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    """A reward model's name or alias (verl sends its reward model path); the default when
    absent."""
    input: list[Annotated[StrictStr, Field(min_length=1)]] = Field(min_length=1)
    """One text or a list of texts."""

    @field_validator("input", mode="before")
    @classmethod
    def _one_text(cls, v: object) -> object:
        if v == "":
            raise ValueError("'input' must be a non-empty string or list of strings")
        return [v] if isinstance(v, str) else v

    @property
    def texts(self) -> list[str]:
        return self.input


class ClassifyRequest(_TextsRequest):
    """vLLM's /classify, as verl's reward loop posts it."""

    use_activation: bool | None = None
    """Apply the model's activation (sigmoid: one label). Absent: on, as vLLM's classify
    defaults it (PoolingParams: use_activation None -> True for task classify)."""
    activation: bool | None = None
    """Legacy name of use_activation (older vLLM); use_activation wins when both are given."""

    @property
    def activated(self) -> bool:
        for flag in (self.use_activation, self.activation):
            if flag is not None:
                return flag
        return True


class ClassifyData(BaseModel):
    index: int
    label: str = "LABEL_0"
    probs: list[float]
    num_classes: int = 1


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


class EmbeddingRequest(_TextsRequest):
    """OpenAI /v1/embeddings, as verl's SGLang reward path posts it; for a reward model the
    embedding of a text is [its raw reward], as SGLang serves reward models."""

    encoding_format: Literal["float", "base64"] = "float"
    """base64: little-endian float32 bytes (the OpenAI Python client asks for this)."""


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
