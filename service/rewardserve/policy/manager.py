"""The policies being served: which exist, which are loaded, which backend runs each.

A backend that dies (its vLLM engine process killed or crashed) is supervised: requests get
503 with the reason, /readyz turns red, and the backend is rebuilt in the background, up to
--policy-max-restarts times, after which it serves again without a process restart.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os

from rewardserve.config import Settings
from rewardserve.policy.base import PolicyBackend
from rewardserve.registry.dtypes import resolve_dtype
from rewardserve.registry.manifest import ModelManifest, resolve_source
from rewardserve.registry.repository import Entry, ModelRepository
from rewardserve.schemas.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

# How often the supervisor looks for dead backends. vLLM notices a dead engine process on
# its own (a monitor thread); this only decides how soon the rebuild starts.
SUPERVISE_INTERVAL_S = 0.5


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def backend_kind(manifest: ModelManifest, settings: Settings) -> str:
    wanted = manifest.policy.backend if manifest.policy else "auto"
    if wanted == "auto":
        wanted = settings.policy_backend
    if wanted == "auto":
        wanted = "vllm" if vllm_installed() else "transformers"
    return wanted


def build_backend(manifest: ModelManifest, entry: Entry, settings: Settings) -> PolicyBackend:
    """Construct the backend (blocking: loads weights, may start a vLLM engine)."""
    folder = resolve_source(manifest, entry.folder, settings.cache_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights of '{manifest.name}' not found at {folder}")
    kind = backend_kind(manifest, settings)
    if kind == "openai":
        from rewardserve.policy.openai_backend import OpenAIPolicy

        assert manifest.policy and manifest.policy.base_url and manifest.policy.remote_model
        return OpenAIPolicy(
            manifest.name,
            folder,
            manifest.max_length,
            manifest.policy.base_url,
            manifest.policy.remote_model,
            api_key=settings.policy_api_key,
            timeout_s=settings.policy_timeout_s,
            max_retries=settings.policy_max_retries,
        )
    if kind == "vllm":
        from rewardserve.policy.vllm_backend import VllmPolicy

        return VllmPolicy(
            manifest.name,
            folder,
            manifest.max_length,
            resolve_dtype(manifest.dtype),
            settings.vllm_kv_cache_gib,
        )
    from rewardserve.policy.hf_backend import TransformersPolicy

    return TransformersPolicy(
        manifest.name,
        folder,
        manifest.max_length,
        manifest.dtype,
        max_queued=settings.policy_max_queued,
    )


class PolicyManager:
    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository.from_settings(settings)
        self.loaded: dict[str, PolicyBackend] = {}
        self.errors: dict[str, str] = {}
        self.expected: list[str] = []
        self.restarts: dict[str, int] = {}
        self._rebuilding: dict[str, asyncio.Task[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        # The vLLM engine starts a process; spawn, not fork: this process runs gRPC and torch
        # threads, which a forked child would inherit in an undefined state.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    @property
    def entries(self) -> dict[str, Entry]:
        return self.repository.of_kind("policy")

    async def start(self) -> None:
        self.expected = self.repository.startup_set("policy")
        for name in list(self.expected):
            try:
                await self.load(name)
            except Exception as e:
                if self.settings.policies:
                    raise
                log.error("not loading policy %s: %s", name, e)
                self.errors[name] = str(e)
                self.expected.remove(name)
        self._supervisor = asyncio.create_task(self._supervise(), name="policy-supervisor")

    async def load(self, name: str) -> PolicyBackend:
        name = self.repository.canonical(name)
        if name in self.loaded:
            return self.loaded[name]
        entry = self.entries.get(name)
        if entry is None or entry.manifest is None:
            raise NotFound(f"no policy '{name}' in the repository", field="policy")
        kind = backend_kind(entry.manifest, self.settings)
        log.info("loading policy %s (%s backend)", name, kind)
        backend = await asyncio.to_thread(build_backend, entry.manifest, entry, self.settings)
        self.loaded[name] = backend
        log.info("policy %s ready", name)
        return backend

    # ---- supervision ------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            for name, backend in list(self.loaded.items()):
                if backend.failure and name not in self._rebuilding:
                    task = asyncio.create_task(self._rebuild(name, backend), name=f"rebuild-{name}")
                    self._rebuilding[name] = task
                    task.add_done_callback(lambda _, n=name: self._rebuilding.pop(n, None))

    async def _rebuild(self, name: str, dead: PolicyBackend) -> None:
        """Replace a dead backend with a new one (the dead one stays in `loaded`, answering
        503 with its reason, until the new one is ready)."""
        reason = dead.failure or "failed"
        done = self.restarts.get(name, 0)
        if done >= self.settings.policy_max_restarts:
            if not self.errors.get(name, "").endswith("(--policy-max-restarts)"):
                log.error("policy %s failed (%s) and is not restarted again", name, reason)
            self.errors[name] = f"{reason}; restarted {done} times (--policy-max-restarts)"
            return
        self.restarts[name] = done + 1
        self.errors[name] = f"{reason}; restarting"
        log.warning(
            "policy %s failed (%s); restarting it (%d of %d)",
            name,
            reason,
            done + 1,
            self.settings.policy_max_restarts,
        )
        try:
            await dead.close()
        except Exception:
            log.warning("policy %s: closing the dead backend failed", name, exc_info=True)
        entry = self.entries[name]
        assert entry.manifest is not None
        try:
            backend = await asyncio.to_thread(build_backend, entry.manifest, entry, self.settings)
        except Exception as e:  # the next supervision round tries again, within the bound
            log.error("policy %s: restart failed: %s", name, e)
            self.errors[name] = f"{reason}; restart failed: {e}"
            return
        self.loaded[name] = backend
        self.errors.pop(name, None)
        log.info("policy %s restarted and serving", name)

    async def close(self) -> None:
        tasks = [t for t in (self._supervisor, *self._rebuilding.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for backend in self.loaded.values():
            await backend.close()
        self.loaded.clear()

    @property
    def ready(self) -> bool:
        return all(n in self.loaded and not self.loaded[n].failure for n in self.expected)

    def default_name(self) -> str | None:
        return self.repository.default_name("policy", self.loaded)

    def resolve(self, name: str | None) -> PolicyBackend:
        """The loaded policy a request names (name or alias), or the default; a dead one is
        a 503."""
        name = self.repository.resolve("policy", name, self.loaded, self.errors)
        backend = self.loaded[name]
        if backend.failure:
            why = self.errors.get(name) or backend.failure
            raise Unavailable(f"policy '{name}' is not available: {why}")
        return backend

    def status(self, name: str) -> str:
        if name in self.loaded:
            return "error" if self.loaded[name].failure else "loaded"
        return "error" if name in self.errors else "available"
