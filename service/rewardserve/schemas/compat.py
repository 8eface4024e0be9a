"""Payloads of the frameworks that call a remote reward model, exactly as they send them.

Unknown fields are ignored here (not refused): these clients add fields across versions.
"""

from __future__ import annotations

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


class ClassifyRequest(BaseModel):
    """vLLM's /classify, as verl's reward loop posts it."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    input: list[Annotated[StrictStr, Field(min_length=1)]] = Field(min_length=1)
    """One text or a list of texts."""
    use_activation: bool | None = None
    activation: bool | None = None
    """Legacy name of use_activation."""

    @field_validator("input", mode="before")
    @classmethod
    def _one_text(cls, v: object) -> object:
        if v == "":
            raise ValueError("'input' must be a non-empty string or list of strings")
        return [v] if isinstance(v, str) else v

    @property
    def texts(self) -> list[str]:
        return self.input

    @property
    def sigmoid(self) -> bool:
        flag = self.use_activation if self.use_activation is not None else self.activation
        return bool(flag)


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
