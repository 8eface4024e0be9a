"""Best-of-N and rerank requests and results.

Limits that depend on the server's settings (n, prompts per request, candidates) are
checked by the service, which names the configured maximum in its error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from rewardserve.schemas.scoring import ChatMessage

StopString = Annotated[StrictStr, Field(min_length=1, max_length=64)]
CandidateText = Annotated[StrictStr, Field(min_length=1)]


class PromptInput(BaseModel):
    """One prompt: raw text for the policy, or chat messages (rendered with its template)."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    label: StrictStr | None = Field(None, min_length=1)
    """Reference answer, for a composite reward model's exact_match parts (ignored by
    others): every candidate of this prompt is compared with it."""

    @model_validator(mode="after")
    def _one_form(self) -> PromptInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of: prompt, messages")
        return self


class SamplingFields(BaseModel):
    temperature: float = Field(1.0, ge=0, le=5)
    """0: greedy (every candidate the same; Best-of-N then needs temperature > 0)."""
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    """New tokens per candidate; prompt + max_tokens must fit the policy's context."""
    seed: int | None = Field(None, ge=0, lt=2**31)
    """Same seed, same request, same backend: same candidates and the same choice."""
    stop: list[StopString] = Field(default_factory=list, max_length=8)


class ObjectiveFields(BaseModel):
    objective: Literal["mean", "worst_case", "uncertainty_weighted"] = "mean"
    """What a reward-model ensemble's candidates are ranked and chosen by (Coste et al.
    2023): mean, the reward; worst_case, the lowest member's normalized reward;
    uncertainty_weighted, the members' mean normalized reward - uncertainty_lambda x their
    variance. With a single reward model every objective is the plain reward."""
    uncertainty_lambda: float = Field(1.0, ge=0, allow_inf_nan=False)
    """lambda of uncertainty_weighted."""


class BestOfNRequest(SamplingFields, ObjectiveFields):
    model_config = ConfigDict(extra="forbid")
    policy: StrictStr | None = None
    """Policy name (GET /v1/models, kind policy); the default one when absent."""
    reward_model: StrictStr | None = None
    """Reward model name; the default one when absent."""
    prompt: StrictStr | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompts: list[PromptInput] | None = Field(None, min_length=1)
    """Batch form: many prompts, one result each (instead of prompt / messages)."""
    label: StrictStr | None = Field(None, min_length=1)
    """With prompt / messages: its reference answer (PromptInput.label); in the batch form
    each prompt carries its own."""
    n: int = Field(8, ge=1)
    """Candidates sampled per prompt (at most the server's --max-n)."""
    top_k: int = Field(1, ge=1)
    """How many of the best candidates the result lists."""
    return_all: bool = False
    """List every candidate (overrides top_k)."""
    selection: Literal["argmax", "soft"] = "argmax"
    """argmax: the highest reward. soft: candidate i with probability ~ exp(r_i / lambda)."""
    selection_temperature: float = Field(1.0, gt=0)
    """lambda of soft selection, in reward units: small -> argmax, large -> uniform."""
    strategy: Literal["full", "speculative"] = "full"
    """full: generate all n to the end. speculative: generate in chunks, score the partial
    candidates and stop the worst (Sun et al. 2024, speculative rejection)."""
    rejection_rate: float = Field(0.5, gt=0, lt=1)
    """speculative: share of the still-running candidates stopped after each chunk."""
    chunk_tokens: int = Field(16, ge=1)
    """speculative: tokens generated between two rejection rounds."""

    @model_validator(mode="after")
    def _one_form(self) -> BestOfNRequest:
        given = [self.prompt is not None, self.messages is not None, self.prompts is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of: prompt, messages, prompts")
        if self.prompts is not None and self.label is not None:
            raise ValueError("with 'prompts', each prompt carries its own 'label'")
        return self

    def inputs(self) -> list[PromptInput]:
        if self.prompts is not None:
            return self.prompts
        return [PromptInput(prompt=self.prompt, messages=self.messages, label=self.label)]


class Candidate(BaseModel):
    index: int
    """Sample number among the n of its prompt."""
    text: str
    reward: float
    normalized_reward: float
    uncertainty: float | None = None
    """Ensembles: std of the members' normalized rewards; null for a single model."""
    members: list[float] | None = None
    """Ensembles: each member's normalized reward; null for a single model."""
    tokens: int
    """Generated tokens."""
    finish_reason: Literal["stop", "length", "rejected"]
    """rejected: stopped early by speculative rejection (its reward is of the partial text)."""


class PromptResult(BaseModel):
    index: int
    """Position of the prompt in the request."""
    chosen: Candidate
    candidates: list[Candidate]
    """Best first: top_k of them, or all with return_all."""
    n: int
    kl_bound: float | None
    """log n - (n - 1)/n: bound on KL(Best-of-n || policy). It holds for argmax over n full
    samples only: null for soft selection and speculative rejection (kl_bound_note says why)."""
    kl_bound_note: str | None = None
    """Why kl_bound is null; absent when it is given."""


class BonUsage(BaseModel):
    prompt_tokens: int
    """Prompt tokens, counted once per prompt (its n samples share the prefill)."""
    generated_tokens: int
    """Every generated token, of chosen, kept and rejected candidates alike."""
    total_tokens: int


class BonTimings(BaseModel):
    generation_s: float
    """From the first generate call until the last candidate finished."""
    scoring_s: float
    """Time spent waiting for rewards that generation did not hide."""
    total_s: float


class BestOfNResponse(BaseModel):
    policy: str
    reward_model: str
    strategy: Literal["full", "speculative"]
    results: list[PromptResult]
    usage: BonUsage
    timings: BonTimings


class RerankRequest(ObjectiveFields):
    model_config = ConfigDict(extra="forbid")
    reward_model: StrictStr | None = None
    prompt: StrictStr | None = None
    """The conversation so far as text (may be empty); or `messages`."""
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    candidates: list[CandidateText] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    """Return only the k best (default: all, ranked)."""
    label: StrictStr | None = Field(None, min_length=1)
    """Reference answer, for a composite reward model's exact_match parts."""

    @model_validator(mode="after")
    def _one_form(self) -> RerankRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of: prompt, messages")
        return self


class RankedCandidate(BaseModel):
    index: int
    """Position of the candidate in the request."""
    text: str
    reward: float
    normalized_reward: float
    uncertainty: float | None = None
    """Ensembles: std of the members' normalized rewards; null for a single model."""
    members: list[float] | None = None
    """Ensembles: each member's normalized reward; null for a single model."""


class RerankResponse(BaseModel):
    reward_model: str
    results: list[RankedCandidate]
    """Best first."""
    usage: BonUsage
