"""Everything a transport calls, built and started once: scoring, policies, Best-of-N, jobs."""

from __future__ import annotations

import asyncio

from rewardserve.bon.service import BestOfN
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.evaluation.store import EvaluationStore
from rewardserve.heap import HeapTrimmer
from rewardserve.jobs.manager import JobManager
from rewardserve.policy.manager import PolicyManager
from rewardserve.registry.repository import ModelRepository
from rewardserve.schemas.models import ModelInfo


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = settings.keyring()  # one for both transports and the jobs manager
        self.repository = ModelRepository.from_settings(settings)
        self.scoring = ScoringEngine(settings, self.repository)
        self.policies = PolicyManager(settings, self.repository)
        self.bon = BestOfN(settings, self.scoring, self.policies)
        self.evaluations = EvaluationStore(settings.data_dir)
        self.heap = HeapTrimmer(settings.heap_trim_interval_s)
        self.jobs: JobManager | None = JobManager(settings, self) if settings.jobs_enabled else None

    async def start(self) -> None:
        self.heap.start()
        await asyncio.gather(self.scoring.start(), self.policies.start())
        if self.jobs is not None:  # after the models: a recovered job's worker needs them
            await self.jobs.start()

    async def close(self) -> None:
        if self.jobs is not None:  # first: no result registers into closing engines
            await self.jobs.close()
        await self.heap.close()
        await self.policies.close()
        await self.scoring.close()

    @property
    def ready(self) -> bool:
        jobs_ready = self.jobs is None or self.jobs.ready
        return self.scoring.ready and self.policies.ready and jobs_ready

    def failures(self) -> dict[str, str]:
        """Loaded models (either kind) that cannot serve right now, and why; `jobs` when the
        jobs manager's loop is down."""
        policies = {n: b.failure for n, b in self.policies.loaded.items() if b.failure}
        jobs = {"jobs": self.jobs.failure} if self.jobs is not None and self.jobs.failure else {}
        return self.scoring.failures() | policies | jobs

    def list_models(self) -> list[ModelInfo]:
        """Reward models (each with its latest evaluation) and policies; a policy's status is
        its backend's, not the scorer's."""
        out = []
        default_policy = self.policies.default_name()
        for info in self.scoring.list_models():
            if info.kind == "policy":
                status = self.policies.status(info.id)
                info = info.model_copy(
                    update={
                        "status": status,
                        "default": info.id == default_policy,
                        "error": self.policies.errors.get(info.id),
                    }
                )
            else:
                info = info.model_copy(update={"evaluation": self.evaluations.summary(info.id)})
            out.append(info)
        return out
