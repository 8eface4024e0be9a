"""Best-of-N and rerank over a policy backend and the scoring engine.

Candidates are scored through the same batcher as /v1/score, each the moment it finishes,
so scoring overlaps the generation of the others. `stream` yields every candidate as it is
scored and then the result; `run` is the same without the candidates on the way. Both
transports call only this class.

A request carries one absolute deadline (time.monotonic()) from its arrival: generation and
every scoring call are bounded by it, and past it the request is DeadlineExceeded and its
work is dropped (generation aborted, queued scoring items cancelled). Admission bounds what
Best-of-N may ask of the shared scorer: a cost cap per request and a limit on requests at
once; within that, its scoring items never count against the scorer's queue limit, so it is
never refused by its own scorer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from jinja2 import TemplateError

from rewardserve import metrics
from rewardserve.bon.selection import reported_kl_bound, select
from rewardserve.bon.speculative import SpeculativeRejection
from rewardserve.config import Settings
from rewardserve.engine.composite import CompositeReward
from rewardserve.engine.scoring import ItemScore, LoadedModel, ScoringEngine
from rewardserve.policy.base import Generation, PolicyBackend, Sampling
from rewardserve.policy.manager import PolicyManager
from rewardserve.rewards.objectives import objective_value
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
from rewardserve.schemas.errors import DeadlineExceeded, InvalidArgument, Overloaded
from rewardserve.schemas.scoring import ChatMessage, ScoreItem

T = TypeVar("T")


async def within(deadline: float, work: Awaitable[T]) -> T:
    """`work`, cancelled (and answered DeadlineExceeded) at `deadline` (time.monotonic())."""
    loop = asyncio.get_running_loop()
    # The loop's clock need not be time.monotonic() (uvloop caches its own): convert.
    when = loop.time() + (deadline - time.monotonic())
    try:
        async with asyncio.timeout_at(when):
            return await work
    except TimeoutError:
        raise DeadlineExceeded(
            "the request's deadline passed; its remaining work was dropped"
        ) from None


@dataclass(frozen=True)
class ScoredCandidate:
    """A stream event: one candidate of prompt `prompt_index`, scored."""

    prompt_index: int
    candidate: Candidate


def policy_prompt_ids(
    policy: PolicyBackend, item: PromptInput, field: str = "messages"
) -> list[int]:
    """Token ids the policy continues: chat messages through its chat template (with the
    assistant turn opened), raw prompts as they are. Messages the policy's template cannot
    render (or a policy without one) are a 400 on `field`, not a 500."""
    tok = policy.tokenizer
    if item.messages is not None:
        msgs = [m.model_dump() for m in item.messages]
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except (ValueError, TemplateError) as e:  # no template, or one that refuses these
            name = getattr(policy, "name", "the policy")
            raise InvalidArgument(
                f"the chat template of policy '{name}' cannot render these messages ({e}); "
                "a policy without a chat template takes a plain 'prompt'",
                field=field,
            ) from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tok(item.prompt)["input_ids"])


def ranking_value(
    score: ItemScore | Candidate | RankedCandidate, objective: str, lam: float
) -> float:
    """What a candidate is ranked and chosen by: its reward under `objective`. `mean` is the
    reward itself (the ensemble's combined reward); the others read the members' normalized
    rewards. A single model has no members, so every objective is its plain reward."""
    if objective == "mean" or score.members is None:
        return score.reward
    return objective_value(objective, score.members, lam)


def reward_item(item: PromptInput, response: str) -> ScoreItem:
    """What the reward model judges: the prompt with the candidate as the assistant's reply.
    Built unvalidated: an empty candidate is a legal (if poor) answer. The prompt's label
    goes with it (a composite's exact_match parts compare the candidate with it)."""
    label = getattr(item, "label", None)
    if item.messages is not None:
        reply = ChatMessage.model_construct(role="assistant", content=response)
        return ScoreItem.model_construct(
            prompt=None, response=None, text=None, messages=[*item.messages, reply], label=label
        )
    return ScoreItem.model_construct(
        prompt=item.prompt, response=response, messages=None, text=None, label=label
    )


class BestOfN:
    def __init__(self, settings: Settings, scoring: ScoringEngine, policies: PolicyManager):
        self.settings, self.scoring, self.policies = settings, scoring, policies
        self.running = 0
        """Best-of-N requests admitted and not yet finished (both transports)."""
        self._avg_request_s = 5.0  # running estimate, for Retry-After

    def deadline(self, timeout_s: float | None) -> float:
        """The deadline of a Best-of-N request arriving now, with the client's timeout (or
        the server's --bon-timeout-s)."""
        return time.monotonic() + (timeout_s or self.settings.bon_timeout_s)

    # ---- helpers ---------------------------------------------------------------------

    async def _reward(
        self, model: LoadedModel | CompositeReward, item: PromptInput, text: str, deadline: float
    ) -> ItemScore:
        if isinstance(model, CompositeReward):  # its total is reward and normalized alike
            (result,) = await model.evaluate(
                self.scoring,
                [reward_item(item, text)],
                deadline=deadline,
                enforce_queue_limit=False,
            )
            return ItemScore(result.reward, result.normalized_reward)
        rendered = self.scoring.render(model, reward_item(item, text))
        _, _, (score,) = await self.scoring.score_items(
            model.name, [rendered], deadline=deadline, enforce_queue_limit=False
        )
        return score

    def _check(self, req: BestOfNRequest, policy: PolicyBackend, prompts: list[list[int]]):
        s = self.settings
        if req.n > s.max_n:
            raise InvalidArgument(f"n={req.n}; at most {s.max_n} (--max-n)", field="n")
        if len(prompts) > s.max_prompts_per_request:
            raise InvalidArgument(
                f"{len(prompts)} prompts; at most {s.max_prompts_per_request} per request",
                field="prompts",
            )
        cost = len(prompts) * req.n * req.max_tokens
        if cost > s.bon_max_cost_tokens:
            raise InvalidArgument(
                f"{len(prompts)} prompts x n={req.n} x max_tokens={req.max_tokens} = {cost:,} "
                f"tokens; at most {s.bon_max_cost_tokens:,} per request "
                "(--bon-max-cost-tokens): ask for fewer candidates or tokens",
                field="n",
            )
        for i, ids in enumerate(prompts):
            if len(ids) + req.max_tokens > policy.max_model_len:
                field = "max_tokens" if len(ids) < policy.max_model_len else "prompt"
                raise InvalidArgument(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={req.max_tokens} that "
                    f"exceeds the context of '{policy.name}' ({policy.max_model_len} tokens)",
                    field=field,
                )

    def _reward_model(self, name: str | None) -> LoadedModel | CompositeReward:
        """The reward model or composite reward a request names (None: the default)."""
        return self.scoring.composite(name) or self.scoring.resolve(name)

    def _admit(self) -> None:
        limit = self.settings.bon_max_concurrency
        if self.running >= limit:
            raise Overloaded(
                f"{self.running} Best-of-N requests running (limit {limit}, "
                "--bon-max-concurrency); retry later",
                retry_after_s=round(max(1.0, self._avg_request_s / limit), 1),
            )

    # ---- Best-of-N -------------------------------------------------------------------

    async def stream(
        self, req: BestOfNRequest, deadline: float | None = None
    ) -> AsyncIterator[ScoredCandidate | BestOfNResponse]:
        """Every candidate as it is scored, then the result; the whole of it within
        `deadline` (time.monotonic(); default: --bon-timeout-s from now)."""
        started = time.perf_counter()
        if deadline is None:
            deadline = self.deadline(None)
        policy = self.policies.resolve(req.policy)
        model = self._reward_model(req.reward_model)
        inputs = req.inputs()
        fields = (
            [f"prompts.{i}.messages" for i in range(len(inputs))]
            if req.prompts is not None
            else ["messages"]
        )
        prompts = [policy_prompt_ids(policy, it, f) for it, f in zip(inputs, fields, strict=True)]
        self._check(req, policy, prompts)
        self._admit()
        self.running += 1
        metrics.BON_RUNNING.inc()
        # The work runs in a task of its own, so the deadline cancels it wherever it is, and
        # never the consumer's code between two events (a gRPC write, say).
        events: asyncio.Queue[ScoredCandidate | asyncio.Task[BestOfNResponse]] = asyncio.Queue()
        work = asyncio.create_task(
            within(
                deadline,
                self._work(req, policy, model, prompts, started, deadline, events.put_nowait),
            )
        )
        work.add_done_callback(events.put_nowait)
        try:
            while not isinstance(event := await events.get(), asyncio.Task):
                yield event
        finally:
            self.running -= 1
            metrics.BON_RUNNING.dec()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            else:
                elapsed = time.perf_counter() - started
                self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * elapsed
        yield event.result()

    async def _work(
        self,
        req: BestOfNRequest,
        policy: PolicyBackend,
        model: LoadedModel | CompositeReward,
        prompts: list[list[int]],
        started: float,
        deadline: float,
        emit: Callable[[ScoredCandidate], None],
    ) -> BestOfNResponse:
        inputs = req.inputs()
        sampling = Sampling(req.temperature, req.top_p, req.max_tokens, req.seed, tuple(req.stop))

        def scored_candidate(gen: Generation, score: ItemScore) -> ScoredCandidate:
            cand = Candidate(
                index=gen.index,
                text=gen.text,
                reward=score.reward,
                normalized_reward=score.normalized_reward,
                uncertainty=score.uncertainty,
                members=score.members,
                tokens=len(gen.token_ids),
                finish_reason=gen.finish_reason,  # type: ignore[arg-type]
            )
            return ScoredCandidate(gen.prompt_index, cand)

        async def reward_of(gen: Generation) -> ItemScore:
            return await self._reward(model, inputs[gen.prompt_index], gen.text, deadline)

        async def score(gen: Generation) -> ScoredCandidate:
            return scored_candidate(gen, await reward_of(gen))

        scored: list[ScoredCandidate] = []

        def done(event: ScoredCandidate) -> None:
            scored.append(event)
            emit(event)

        generated_tokens = 0
        if req.strategy == "speculative":
            spec = SpeculativeRejection(
                policy,
                prompts,
                req.n,
                sampling,
                req.rejection_rate,
                req.chunk_tokens,
                reward_of,
                key=lambda score: ranking_value(score, req.objective, req.uncertainty_lambda),
            )
            async for ended in spec.run():
                # a rejected candidate keeps the reward its partial text got: scored once
                done(scored_candidate(ended.generation, ended.reward))
            generated_tokens, generation_end = spec.generated_tokens, spec.generation_end
        else:
            pending: set[asyncio.Task[ScoredCandidate]] = set()
            try:
                async with contextlib.aclosing(policy.generate(prompts, req.n, sampling)) as gens:
                    async for gen in gens:
                        generated_tokens += len(gen.token_ids)
                        pending.add(asyncio.create_task(score(gen)))
                        for task in [t for t in pending if t.done()]:
                            pending.discard(task)
                            done(task.result())
                generation_end = time.perf_counter()
                for next_done in asyncio.as_completed(pending):
                    done(await next_done)
                pending.clear()
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        ended = time.perf_counter()
        return self._response(
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

    async def run(self, req: BestOfNRequest, deadline: float | None = None) -> BestOfNResponse:
        async with contextlib.aclosing(self.stream(req, deadline)) as events:
            async for event in events:
                if isinstance(event, BestOfNResponse):
                    return event
        raise AssertionError("stream ended without a result")

    def _response(
        self,
        req: BestOfNRequest,
        policy: PolicyBackend,
        model: LoadedModel | CompositeReward,
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
            lam = req.uncertainty_lambda
            value = {c.index: ranking_value(c, req.objective, lam) for c in cands}
            pick = select(
                [value[c.index] for c in eligible],
                req.selection,
                req.selection_temperature,
                None if req.seed is None else req.seed + p,
            )
            # Finished candidates first: a rejected one's reward is of its partial text.
            ranked = sorted(
                cands, key=lambda c: (c.finish_reason == "rejected", -value[c.index], c.index)
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
            reward_model=model.name,
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

    async def rerank(
        self, req: RerankRequest, timeout_s: float | None = None, *, deadline: float | None = None
    ) -> RerankResponse:
        """The candidates ranked; within `deadline` (time.monotonic()), else `timeout_s`, else
        --request-timeout-s from now."""
        if deadline is None:
            deadline = time.monotonic() + (timeout_s or self.settings.request_timeout_s)
        if len(req.candidates) > self.settings.max_candidates:
            raise InvalidArgument(
                f"{len(req.candidates)} candidates; at most {self.settings.max_candidates}",
                field="candidates",
            )
        model = self._reward_model(req.reward_model)
        item = PromptInput.model_construct(
            prompt=req.prompt, messages=req.messages, label=req.label
        )
        if isinstance(model, CompositeReward):  # its totals rank the candidates (no members)
            items = [reward_item(item, c) for c in req.candidates]
            results = await within(
                deadline,
                model.evaluate(self.scoring, items, deadline=deadline, field_of="candidates"),
            )
            scores = [ItemScore(r.reward, r.normalized_reward) for r in results]
            tokens = sum(r.tokens for r in results)
        else:
            texts = [self.scoring.render(model, reward_item(item, c)) for c in req.candidates]
            model, encoded, scores = await within(
                deadline,
                self.scoring.score_items(
                    model.name, texts, field_of="candidates", deadline=deadline
                ),
            )
            tokens = sum(len(e) for e in encoded)
        value = [ranking_value(s, req.objective, req.uncertainty_lambda) for s in scores]
        ranked = sorted(range(len(scores)), key=lambda i: (-value[i], i))
        if req.top_k is not None:
            ranked = ranked[: req.top_k]
        return RerankResponse(
            reward_model=model.name,
            results=[
                RankedCandidate(
                    index=i,
                    text=req.candidates[i],
                    reward=scores[i].reward,
                    normalized_reward=scores[i].normalized_reward,
                    uncertainty=scores[i].uncertainty,
                    members=scores[i].members,
                )
                for i in ranked
            ],
            usage=BonUsage(prompt_tokens=tokens, generated_tokens=0, total_tokens=tokens),
        )
