"""The scoring engine: the loaded reward models, their batchers, and the score operation.

Both transports call only this class (plus the schemas), so REST and gRPC give the same
results to the last float.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rewardserve.config import Settings
from rewardserve.engine.batcher import Batcher, BatchLimits
from rewardserve.engine.inputs import Encoded, join_pair, render_hh
from rewardserve.engine.scorer import ChatTemplateError, RewardScorer
from rewardserve.registry.loader import load_reward_model
from rewardserve.registry.manifest import ManifestError, ModelManifest, resolve_source
from rewardserve.registry.repository import Entry, scan_repository
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
class LoadedModel:
    manifest: ModelManifest
    scorer: RewardScorer
    batcher: Batcher

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self.scorer.encode(texts)


class ScoringEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.entries: dict[str, Entry] = scan_repository(settings.model_repository)
        self.models: dict[str, LoadedModel] = {}
        # One forward at a time across all models: torch already uses every core for one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._admin_lock = asyncio.Lock()
        self.started = False
        self.expected: list[str] = []
        self.limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_items=settings.max_queue_items,
        )
        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)

    # ---- lifecycle -------------------------------------------------------------------

    def startup_models(self) -> list[str]:
        """--models, else every reward model whose weights are present (missing ones are
        logged: `make models` builds them)."""
        if self.settings.models:
            return list(self.settings.models)
        names = []
        for name, e in self.entries.items():
            if e.manifest is None or e.manifest.kind != "reward":
                continue
            try:
                present = resolve_source(e.manifest, e.folder, self.settings.cache_dir).is_dir()
            except ManifestError as err:
                log.error("not loading %s: %s", name, err)
                continue
            if present:
                names.append(name)
            else:
                log.warning("not loading %s: its weights are not built (run `make models`)", name)
        return names

    async def start(self) -> None:
        """Load the start-up models. Ones named by --models must load; of the ones found in
        the repository, a model that cannot load is logged and left out."""
        self.expected = self.startup_models()
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
        for name in list(self.models):
            await self.unload(name)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        default = self.default_name()
        return (
            self.started
            and all(n in self.models for n in self.expected)
            and (default is None or default in self.models)
        )

    async def load(self, name: str) -> ModelInfo:
        async with self._admin_lock:
            if name not in self.models:
                self.entries = scan_repository(self.settings.model_repository)
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
                    scorer = await asyncio.to_thread(
                        load_reward_model,
                        entry.manifest,
                        entry.folder,
                        self.settings.cache_dir,
                        self.settings.allow_trust_remote_code,
                    )
                except FileNotFoundError as e:
                    raise Unavailable(str(e)) from None
                except ValueError as e:  # ManifestError and transformers' config errors
                    raise InvalidArgument(str(e), field="model") from None
                batcher = Batcher(name, scorer.forward, self._executor, self.limits)
                batcher.start()
                self.models[name] = LoadedModel(entry.manifest, scorer, batcher)
            return self._info(name)

    async def unload(self, name: str) -> ModelInfo:
        async with self._admin_lock:
            model = self.models.pop(name, None)
            if model is None:
                raise NotFound(f"model '{name}' is not loaded", field="model")
            if name in self.expected:  # unloaded on purpose: readiness no longer waits for it
                self.expected.remove(name)
            await model.batcher.close()
            return self._info(name)

    # ---- queries ---------------------------------------------------------------------

    def default_name(self) -> str | None:
        """The configured default, else the reward model whose manifest says default, else
        the only loaded model. Never silently another model when the default is unloaded."""
        if self.settings.default_model:
            return self.settings.default_model
        marked = [
            n
            for n, e in self.entries.items()
            if e.manifest is not None and e.manifest.kind == "reward" and e.manifest.default
        ]
        if marked:
            return marked[0]
        return next(iter(self.models)) if len(self.models) == 1 else None

    def resolve(self, name: str | None) -> LoadedModel:
        if name is None:
            name = self.default_name()
            if name is None:
                loaded = ", ".join(sorted(self.models)) or "none"
                raise InvalidArgument(
                    f"no default reward model; name one of: {loaded}", field="model"
                )
            if name not in self.models:
                raise Unavailable(f"the default reward model '{name}' is not loaded")
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"reward model '{name}' is not loaded (loaded: {known})", field="model")
        return model

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
        return ModelInfo(
            id=name,
            kind=manifest.kind,
            status="loaded" if loaded else "available",
            default=name == self.default_name(),
            max_length=manifest.max_length,
            description=manifest.description,
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
    ) -> tuple[LoadedModel, list[Encoded], list[float]]:
        """Rendered texts -> (model, encodings, raw rewards). The one path every API takes."""
        # The deadline runs from arrival: time spent tokenizing counts against it too.
        deadline = time.monotonic() + (timeout_s or self.settings.request_timeout_s)
        self._check_limits(texts, field_of)
        model = self.resolve(name)
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            encoded = model.encode(texts)
        else:
            encoded = await asyncio.to_thread(model.encode, texts)
        rewards = await model.batcher.submit(encoded, deadline)
        return model, encoded, rewards

    async def score(self, req: ScoreRequest, timeout_s: float | None = None) -> ScoreResponse:
        if len(req.items) > self.settings.max_items_per_request:
            self._check_limits([""] * len(req.items), "items")
        model = self.resolve(req.model)
        texts = [self.render(model, it, f"items.{i}.messages") for i, it in enumerate(req.items)]
        model, encoded, rewards = await self.score_texts(model.scorer.name, texts, timeout_s)
        norm = model.scorer.normalizer
        results = [
            ScoreResult(
                index=i, reward=r, normalized_reward=norm(r), truncated=e.truncated, tokens=len(e)
            )
            for i, (e, r) in enumerate(zip(encoded, rewards, strict=True))
        ]
        tokens = sum(len(e) for e in encoded)
        return ScoreResponse(
            model=model.scorer.name,
            results=results,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
