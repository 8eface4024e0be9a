"""The scoring engine: the loaded reward models, their batchers, and the score operation.

Both transports call only this class (plus the schemas), so REST and gRPC give the same
results to the last float.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from rewardserve.config import Settings
from rewardserve.engine.batcher import Batcher, BatchLimits
from rewardserve.engine.composite import CompositeReward, load_composite
from rewardserve.engine.inputs import Encoded, join_pair, render_hh
from rewardserve.engine.loader import load_reward_members, same_tokenizer
from rewardserve.engine.scorer import ChatTemplateError, RewardScorer
from rewardserve.registry.manifest import ModelManifest
from rewardserve.registry.repository import Entry, ModelRepository
from rewardserve.rewards import objectives
from rewardserve.schemas.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from rewardserve.schemas.models import ModelInfo
from rewardserve.schemas.scoring import ScoreItem, ScoreRequest, ScoreResponse, ScoreResult, Usage

log = logging.getLogger(__name__)

# Requests up to this many characters are tokenized on the event loop (about 0.4 ms of
# WordPiece per 1,000 characters here): a hop to a worker thread costs more than that and
# steals a core from the forward's threads. Larger requests go to a thread so the loop keeps
# serving others.
INLINE_TOKENIZE_CHARS = 8192


@dataclass
class Member:
    """One reward model that scores: a single model's only member, or one of an ensemble's."""

    scorer: RewardScorer
    batcher: Batcher


@dataclass
class LoadedModel:
    manifest: ModelManifest
    members: list[Member]
    """One for a single model; an ensemble's in manifest order."""
    shared_tokenizer: bool = True
    """Every member tokenizes alike, so items are tokenized once for all of them."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def scorer(self) -> RewardScorer:
        """The first member's scorer: its chat template renders an item for every member."""
        return self.members[0].scorer

    @property
    def is_ensemble(self) -> bool:
        return self.manifest.ensemble is not None

    @property
    def failure(self) -> str | None:
        """Why the model cannot serve now (a member's batcher loop died), or None."""
        return next((m.batcher.failure for m in self.members if m.batcher.failure), None)

    @property
    def gave_up(self) -> bool:
        return any(m.batcher.gave_up for m in self.members)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self.scorer.encode(texts)

    def encode_members(self, texts: Sequence[str]) -> list[list[Encoded]]:
        """Each member's encodings of `texts` (one shared list when they share a tokenizer)."""
        if self.shared_tokenizer:
            return [self.encode(texts)] * len(self.members)
        return [m.scorer.encode(texts) for m in self.members]

    def combine(self, raw: Sequence[Sequence[float]]) -> list[ItemScore]:
        """Items' scores from each member's raw rewards (raw[member][item])."""
        if not self.is_ensemble:
            norm = self.scorer.normalizer
            return [ItemScore(r, norm(r)) for r in raw[0]]
        assert self.manifest.ensemble is not None
        by_raw = self.manifest.ensemble.combine == "raw"
        out = []
        for rewards in zip(*raw, strict=True):
            normed = [m.scorer.normalizer(r) for m, r in zip(self.members, rewards, strict=True)]
            normalized = objectives.mean(normed)
            reward = objectives.mean(rewards) if by_raw else normalized
            out.append(ItemScore(reward, normalized, objectives.std(normed), normed))
        return out

    async def submit(
        self, encodings: Sequence[list[Encoded]], deadline: float, enforce_queue_limit: bool
    ) -> list[list[float]]:
        """Each member's raw rewards, its batcher scoring them concurrently with the others'.
        The first member to fail fails the call, and the others' items are dropped."""
        if len(self.members) == 1:
            (member,) = self.members
            return [
                await member.batcher.submit(
                    encodings[0], deadline, enforce_queue_limit=enforce_queue_limit
                )
            ]
        work = [
            asyncio.ensure_future(
                m.batcher.submit(enc, deadline, enforce_queue_limit=enforce_queue_limit)
            )
            for m, enc in zip(self.members, encodings, strict=True)
        ]
        try:
            await asyncio.wait(work, return_when=asyncio.FIRST_EXCEPTION)
            for task in work:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return [task.result() for task in work]
        finally:
            for task in work:
                task.cancel()
            await asyncio.gather(*work, return_exceptions=True)


@dataclass(frozen=True)
class ItemScore:
    """What a reward model says about one item."""

    reward: float
    """Raw (a single model), or an ensemble's combined reward (manifest ensemble.combine)."""
    normalized_reward: float
    uncertainty: float | None = None
    """Ensembles: population std of the members' normalized rewards."""
    members: list[float] | None = None
    """Ensembles: each member's normalized reward, in manifest order."""


class ScoringEngine:
    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository.from_settings(settings)
        self.models: dict[str, LoadedModel] = {}
        self.composites: dict[str, CompositeReward] = {}
        """Loaded composite rewards (engine/composite.py): no weights of their own, scored
        through the models of `models` their parts name."""
        # Why a model could not be loaded (bad weights, none built): listed as status error
        # until a load succeeds, so one broken model is visible while the others serve.
        self.failed: dict[str, str] = {}
        # One forward at a time across all models: torch already uses every core for one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._admin_lock = asyncio.Lock()
        self.started = False
        self.expected: list[str] = []
        self.readiness_listeners: list[Callable[[], None]] = []
        """Called whenever `ready` may have changed (a model loaded, unloaded, failed or
        restarted), so a transport's health service can follow it."""
        self.limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_items=settings.max_queue_items,
        )
        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def entries(self) -> dict[str, Entry]:
        return self.repository.entries

    async def start(self) -> None:
        """Load the start-up models. Ones named by --models must load; of the ones found in
        the repository, a model that cannot load is logged and left out."""
        self.expected = self.repository.startup_set("reward")
        for name in list(self.expected):
            try:
                await self.load(name)
            except ServiceError as e:
                if self.settings.models:
                    raise
                log.error("not loading %s: %s", name, e.message)
                self.expected.remove(name)
        self.started = True

    async def close(self) -> None:
        self.started = False  # not ready while shutting down, whatever is left loaded
        self.composites.clear()
        for name in list(self.models):
            await self.unload(name)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        default = self.default_name()
        return (
            self.started
            and all(n in self.models or n in self.composites for n in self.expected)
            and (default is None or default in self.models or default in self.composites)
            and not self.failures()
        )

    def _readiness_changed(self) -> None:
        for listener in self.readiness_listeners:
            listener()

    def failures(self) -> dict[str, str]:
        """Loaded models that cannot serve right now (their batcher loop died), and why."""
        return {n: m.failure for n, m in self.models.items() if m.failure}

    async def load(self, name: str) -> ModelInfo:
        """Load a reward model; a composite loads the models its parts name."""
        self.repository.rescan()
        entry = self.entries.get(self.repository.canonical(name))
        if entry is not None and entry.manifest is not None and entry.manifest.composite:
            composite = await load_composite(self, entry.manifest)
            self.composites[composite.name] = composite
            self._readiness_changed()
            return self._info(composite.name)
        async with self._admin_lock:
            self.repository.rescan()
            name = self.repository.canonical(name)
            failed = self.models.get(name)
            if failed is not None and failed.gave_up:  # loading again is the way back
                del self.models[name]
                await self._close(failed)
            if name not in self.models:
                entry = self.entries.get(name)
                if entry is None:
                    raise NotFound(f"no model '{name}' in the repository", field="model")
                if entry.manifest is None:
                    raise InvalidArgument(
                        f"model '{name}' has a bad manifest: {entry.error}", field="model"
                    )
                if entry.manifest.kind != "reward":
                    raise InvalidArgument(
                        f"model '{name}' is a {entry.manifest.kind}, not a reward model",
                        field="model",
                    )
                try:
                    scorers = await asyncio.to_thread(
                        load_reward_members,
                        entry.manifest,
                        entry.folder,
                        self.settings.cache_dir,
                        self.settings.allow_trust_remote_code,
                    )
                except FileNotFoundError as e:
                    self.failed[name] = str(e)
                    raise Unavailable(str(e)) from None
                except ValueError as e:  # ManifestError and transformers' config errors
                    self.failed[name] = str(e)
                    raise InvalidArgument(str(e), field="model") from None
                except Exception as e:  # unreadable weights (e.g. a corrupt safetensors file)
                    self.failed[name] = f"could not load its weights: {type(e).__name__}: {e}"
                    raise Unavailable(f"model '{name}' {self.failed[name]}") from None
                self.failed.pop(name, None)
                self.models[name] = self._serve(entry.manifest, scorers)
                self._readiness_changed()
            return self._info(name)

    async def unload(self, name: str) -> ModelInfo:
        async with self._admin_lock:
            name = self.repository.canonical(name)
            if self.composites.pop(name, None) is not None:  # its part models stay loaded
                if name in self.expected:
                    self.expected.remove(name)
                self._readiness_changed()
                return self._info(name)
            model = self.models.pop(name, None)
            if model is None:
                raise NotFound(f"model '{name}' is not loaded", field="model")
            if name in self.expected:  # unloaded on purpose: readiness no longer waits for it
                self.expected.remove(name)
            await self._close(model)
            self._readiness_changed()
            return self._info(name)

    def _serve(self, manifest: ModelManifest, scorers: list[RewardScorer]) -> LoadedModel:
        """The loaded scorers with a started batcher each (all on the one forward thread)."""
        labels = manifest.ensemble.members if manifest.ensemble else [None]
        members = []
        for scorer, label in zip(scorers, labels, strict=True):
            batcher = Batcher(
                manifest.name if label is None else f"{manifest.name}/{label}",
                scorer.forward,
                self._executor,
                self.limits,
                max_restarts=self.settings.batcher_max_restarts,
                restart_backoff_s=self.settings.batcher_restart_backoff_s,
                on_change=self._readiness_changed,
            )
            batcher.start()
            members.append(Member(scorer, batcher))
        shared = all(same_tokenizer(scorers[0].tokenizer, s.tokenizer) for s in scorers[1:])
        if not shared:
            log.info("members of %s tokenize differently: each encodes its own", manifest.name)
        return LoadedModel(manifest, members, shared_tokenizer=shared)

    @staticmethod
    async def _close(model: LoadedModel) -> None:
        for member in model.members:
            await member.batcher.close()

    # ---- queries ---------------------------------------------------------------------

    def default_name(self) -> str | None:
        return self.repository.default_name("reward", self.models)

    def resolve(self, name: str | None) -> LoadedModel:
        """The loaded reward model a request names (name or alias), or its default."""
        return self.models[self.repository.resolve("reward", name, self.models, self.failed)]

    def composite(self, name: str | None) -> CompositeReward | None:
        """The loaded composite a request names (None: the default), or None when the name
        means a loaded plain model; the usual error when it means neither."""
        loaded = [*self.models, *self.composites]
        return self.composites.get(self.repository.resolve("reward", name, loaded, self.failed))

    def _info(self, name: str) -> ModelInfo:
        entry = self.entries.get(name)
        loaded = self.models.get(name)
        manifest = loaded.manifest if loaded else (entry.manifest if entry else None)
        if manifest is None:
            return ModelInfo(
                id=name,
                kind="reward",
                status="error",
                max_length=0,
                error=entry.error if entry else "unknown",
            )
        active = name in self.composites
        if loaded:
            failure = loaded.failure
        elif active:
            failure = None
        else:
            # Policies' state is the policy manager's (Runtime.list_models).
            unservable = self.repository.unservable(name) if manifest.kind == "reward" else None
            failure = self.failed.get(name) or unservable
        return ModelInfo(
            id=name,
            aliases=list(manifest.aliases),
            kind=manifest.kind,
            status="error" if failure else "loaded" if loaded or active else "available",
            default=name == self.default_name(),
            max_length=manifest.max_length,
            description=manifest.description,
            error=failure,
            members=len(manifest.ensemble.members) if manifest.ensemble else None,
        )

    def list_models(self) -> list[ModelInfo]:
        return [self._info(n) for n in sorted(set(self.entries) | set(self.models))]

    # ---- scoring ---------------------------------------------------------------------

    def render(self, model: LoadedModel, item: ScoreItem, field: str = "messages") -> str:
        """The text a reward model scores for an item: its template or HH text.

        A chat template's text comes back as a TemplatedText, which the encoder tokenizes
        without adding special tokens. A template that refuses the messages is a 400 on
        `field`.
        """
        if item.text is not None:
            return item.text
        if item.messages is not None:
            if model.scorer.chat_template:
                try:
                    return model.scorer.apply_chat_template([m.model_dump() for m in item.messages])
                except ChatTemplateError as e:
                    raise InvalidArgument(
                        f"the chat template of '{model.scorer.name}' refused these messages: {e}",
                        field=field,
                    ) from None
            return render_hh(item.messages)
        assert item.prompt is not None and item.response is not None
        return join_pair(item.prompt, item.response)

    def _check_limits(self, texts: Sequence[str], field_of: str) -> None:
        if len(texts) > self.settings.max_items_per_request:
            raise InvalidArgument(
                f"{len(texts)} items; at most {self.settings.max_items_per_request} per request",
                field=field_of,
            )
        for i, t in enumerate(texts):
            if len(t) > self.settings.max_text_chars:
                raise InvalidArgument(
                    f"item {i} has {len(t)} characters; at most {self.settings.max_text_chars}",
                    field=f"{field_of}.{i}",
                )

    async def score_texts(
        self,
        name: str | None,
        texts: Sequence[str],
        timeout_s: float | None = None,
        field_of: str = "items",
        **options: Any,
    ) -> tuple[LoadedModel, list[Encoded], list[float]]:
        """Rendered texts -> (model, encodings, rewards): raw rewards of a single model, an
        ensemble's combined `reward`. What the compat routes and PPO read; score_items
        (which takes the same `options`) gives the whole of each result."""
        model, encoded, scores = await self.score_items(name, texts, timeout_s, field_of, **options)
        return model, encoded, [s.reward for s in scores]

    async def score_items(
        self,
        name: str | None,
        texts: Sequence[str],
        timeout_s: float | None = None,
        field_of: str = "items",
        *,
        deadline: float | None = None,
        enforce_queue_limit: bool = True,
    ) -> tuple[LoadedModel, list[Encoded], list[ItemScore]]:
        """Rendered texts -> (model, encodings, scores). The one path every API takes.

        enforce_queue_limit=False is for callers that do their own admission (Best-of-N):
        they never get a 429 from the scorer. `deadline` (time.monotonic()) is the caller's
        whole-request deadline and wins over `timeout_s`; without either, the request gets
        --request-timeout-s from now. The encodings are the first member's (an ensemble's
        members share them unless their tokenizers differ).
        """
        if deadline is None:
            # The deadline runs from arrival: time spent tokenizing counts against it too.
            deadline = time.monotonic() + (timeout_s or self.settings.request_timeout_s)
        self._check_limits(texts, field_of)
        model = self.resolve(name)
        if enforce_queue_limit:  # before tokenizing a request that could never be queued
            for member in model.members:
                member.batcher.check_request_size(len(texts), field_of)
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            encodings = model.encode_members(texts)
        else:
            encodings = await asyncio.to_thread(model.encode_members, texts)
        raw = await model.submit(encodings, deadline, enforce_queue_limit)
        return model, encodings[0], model.combine(raw)

    async def score(self, req: ScoreRequest, timeout_s: float | None = None) -> ScoreResponse:
        if len(req.items) > self.settings.max_items_per_request:
            self._check_limits([""] * len(req.items), "items")
        composite = self.composite(req.model)
        if composite is not None:
            return await composite.score(self, req, timeout_s)
        if req.weights is not None:
            raise InvalidArgument(
                f"'{self.resolve(req.model).name}' is not a composite reward: it has "
                "no part weights",
                field="weights",
            )
        model = self.resolve(req.model)
        texts = [self.render(model, it, f"items.{i}.messages") for i, it in enumerate(req.items)]
        model, encoded, scores = await self.score_items(model.name, texts, timeout_s)
        results = [
            ScoreResult(
                index=i,
                reward=s.reward,
                normalized_reward=s.normalized_reward,
                uncertainty=s.uncertainty,
                members=s.members,
                truncated=e.truncated,
                tokens=len(e),
            )
            for i, (e, s) in enumerate(zip(encoded, scores, strict=True))
        ]
        tokens = sum(len(e) for e in encoded)
        return ScoreResponse(
            model=model.name,
            results=results,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
