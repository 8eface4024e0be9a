"""Best-of-N and rerank over a policy backend and the scoring engine.

Candidates are scored through the same batcher as /v1/score, each the moment it finishes,
so scoring overlaps the generation of the others. `stream` yields every candidate as it is
scored and then the result; `run` is the same without the candidates on the way. Both
transports call only this class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from rewardserve.bon.selection import reported_kl_bound, select
from rewardserve.bon.speculative import SpeculativeRejection
from rewardserve.config import Settings
from rewardserve.engine.engine import LoadedModel, ScoringEngine
from rewardserve.policy.base import Generation, PolicyBackend, Sampling
from rewardserve.policy.manager import PolicyManager
from rewardserve.schemas.bon import (
    BestOfNRequest,
    BestOfNResponse,
    BonTimings,
    BonUsage,
    Candidate,
    PromptInput,
    PromptResult,
    RankedCandidate,
    RerankRequest,
    RerankResponse,
)
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.scoring import ChatMessage, ScoreItem


@dataclass(frozen=True)
class ScoredCandidate:
    """A stream event: one candidate of prompt `prompt_index`, scored."""

    prompt_index: int
    candidate: Candidate


def policy_prompt_ids(policy: PolicyBackend, item: PromptInput) -> list[int]:
    """Token ids the policy continues: chat messages through its chat template (with the
    assistant turn opened), raw prompts as they are."""
    tok = policy.tokenizer
    if item.messages is not None:
        msgs = [m.model_dump() for m in item.messages]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tok(item.prompt)["input_ids"])


def reward_item(item: PromptInput, response: str) -> ScoreItem:
    """What the reward model judges: the prompt with the candidate as the assistant's reply.
    Built unvalidated: an empty candidate is a legal (if poor) answer."""
    if item.messages is not None:
        reply = ChatMessage.model_construct(role="assistant", content=response)
        return ScoreItem.model_construct(
            prompt=None, response=None, text=None, messages=[*item.messages, reply]
        )
    return ScoreItem.model_construct(
        prompt=item.prompt, response=response, messages=None, text=None
    )


class BestOfN:
    def __init__(self, settings: Settings, scoring: ScoringEngine, policies: PolicyManager):
        self.settings, self.scoring, self.policies = settings, scoring, policies

    # ---- helpers ---------------------------------------------------------------------

    async def _reward(
        self, model: LoadedModel, item: PromptInput, text: str
    ) -> tuple[float, float]:
        rendered = self.scoring.render(model, reward_item(item, text))
        _, _, (reward,) = await self.scoring.score_texts(model.scorer.name, [rendered])
        return reward, model.scorer.normalizer(reward)

    def _check(self, req: BestOfNRequest, policy: PolicyBackend, prompts: list[list[int]]):
        s = self.settings
        if req.n > s.max_n:
            raise InvalidArgument(f"n={req.n}; at most {s.max_n} (--max-n)", field="n")
        if len(prompts) > s.max_prompts_per_request:
            raise InvalidArgument(
                f"{len(prompts)} prompts; at most {s.max_prompts_per_request} per request",
                field="prompts",
            )
        for i, ids in enumerate(prompts):
            if len(ids) + req.max_tokens > policy.max_model_len:
                field = "max_tokens" if len(ids) < policy.max_model_len else "prompt"
                raise InvalidArgument(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={req.max_tokens} that "
                    f"exceeds the context of '{policy.name}' ({policy.max_model_len} tokens)",
                    field=field,
                )

    # ---- Best-of-N -------------------------------------------------------------------

    async def stream(self, req: BestOfNRequest) -> AsyncIterator[ScoredCandidate | BestOfNResponse]:
        started = time.perf_counter()
        policy = self.policies.resolve(req.policy)
        model = self.scoring.resolve(req.reward_model)
        inputs = req.inputs()
        prompts = [policy_prompt_ids(policy, it) for it in inputs]
        self._check(req, policy, prompts)
        sampling = Sampling(req.temperature, req.top_p, req.max_tokens, req.seed, tuple(req.stop))

        def scored_candidate(gen: Generation, reward: float) -> ScoredCandidate:
            cand = Candidate(
                index=gen.index,
                text=gen.text,
                reward=reward,
                normalized_reward=model.scorer.normalizer(reward),
                tokens=len(gen.token_ids),
                finish_reason=gen.finish_reason,  # type: ignore[arg-type]
            )
            return ScoredCandidate(gen.prompt_index, cand)

        async def reward_of(gen: Generation) -> float:
            return (await self._reward(model, inputs[gen.prompt_index], gen.text))[0]

        async def score(gen: Generation) -> ScoredCandidate:
            return scored_candidate(gen, await reward_of(gen))

        scored: list[ScoredCandidate] = []
        generated_tokens = 0
        if req.strategy == "speculative":
            spec = SpeculativeRejection(
                policy, prompts, req.n, sampling, req.rejection_rate, req.chunk_tokens, reward_of
            )
            async for ended in spec.run():
                # a rejected candidate keeps the reward its partial text got: scored once
                scored.append(scored_candidate(ended.generation, ended.reward))
                yield scored[-1]
            generated_tokens, generation_end = spec.generated_tokens, spec.generation_end
        else:
            pending: set[asyncio.Task[ScoredCandidate]] = set()
            try:
                async for gen in policy.generate(prompts, req.n, sampling):
                    generated_tokens += len(gen.token_ids)
                    pending.add(asyncio.create_task(score(gen)))
                    for task in [t for t in pending if t.done()]:
                        pending.discard(task)
                        scored.append(task.result())
                        yield scored[-1]
                generation_end = time.perf_counter()
                for next_done in asyncio.as_completed(pending):
                    scored.append(await next_done)
                    yield scored[-1]
                pending.clear()
            finally:
                for t in pending:
                    t.cancel()
        ended = time.perf_counter()
        yield self._response(
            req,
            policy,
            model,
            inputs,
            prompts,
            scored,
            generated_tokens,
            BonTimings(
                generation_s=generation_end - started,
                scoring_s=ended - generation_end,
                total_s=ended - started,
            ),
        )

    async def run(self, req: BestOfNRequest) -> BestOfNResponse:
        async for event in self.stream(req):
            if isinstance(event, BestOfNResponse):
                return event
        raise AssertionError("stream ended without a result")

    def _response(
        self,
        req: BestOfNRequest,
        policy: PolicyBackend,
        model: LoadedModel,
        inputs: Sequence[PromptInput],
        prompts: Sequence[list[int]],
        scored: Sequence[ScoredCandidate],
        generated_tokens: int,
        timings: BonTimings,
    ) -> BestOfNResponse:
        results = []
        bound, bound_note = reported_kl_bound(req.n, req.selection, req.strategy)
        for p in range(len(inputs)):
            cands = sorted(
                (e.candidate for e in scored if e.prompt_index == p), key=lambda c: c.index
            )
            eligible = [c for c in cands if c.finish_reason != "rejected"] or cands
            pick = select(
                [c.reward for c in eligible],
                req.selection,
                req.selection_temperature,
                None if req.seed is None else req.seed + p,
            )
            # Finished candidates first: a rejected one's reward is of its partial text.
            ranked = sorted(
                cands, key=lambda c: (c.finish_reason == "rejected", -c.reward, c.index)
            )
            results.append(
                PromptResult(
                    index=p,
                    chosen=eligible[pick],
                    candidates=ranked if req.return_all else ranked[: req.top_k],
                    n=req.n,
                    kl_bound=bound,
                    kl_bound_note=bound_note,
                )
            )
        prompt_tokens = sum(len(ids) for ids in prompts)
        return BestOfNResponse(
            policy=policy.name,
            reward_model=model.scorer.name,
            strategy=req.strategy,
            results=results,
            usage=BonUsage(
                prompt_tokens=prompt_tokens,
                generated_tokens=generated_tokens,
                total_tokens=prompt_tokens + generated_tokens,
            ),
            timings=timings,
        )

    # ---- rerank ----------------------------------------------------------------------

    async def rerank(self, req: RerankRequest, timeout_s: float | None = None) -> RerankResponse:
        if len(req.candidates) > self.settings.max_candidates:
            raise InvalidArgument(
                f"{len(req.candidates)} candidates; at most {self.settings.max_candidates}",
                field="candidates",
            )
        model = self.scoring.resolve(req.reward_model)
        item = PromptInput.model_construct(prompt=req.prompt, messages=req.messages)
        texts = [self.scoring.render(model, reward_item(item, c)) for c in req.candidates]
        model, encoded, rewards = await self.scoring.score_texts(
            model.scorer.name, texts, timeout_s, field_of="candidates"
        )
        norm = model.scorer.normalizer
        ranked = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
        if req.top_k is not None:
            ranked = ranked[: req.top_k]
        tokens = sum(len(e) for e in encoded)
        return RerankResponse(
            reward_model=model.scorer.name,
            results=[
                RankedCandidate(
                    index=i,
                    text=req.candidates[i],
                    reward=rewards[i],
                    normalized_reward=norm(rewards[i]),
                )
                for i in ranked
            ],
            usage=BonUsage(prompt_tokens=tokens, generated_tokens=0, total_tokens=tokens),
        )
