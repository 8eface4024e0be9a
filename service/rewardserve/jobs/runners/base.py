"""What the jobs manager asks of a runner: start one attempt of a job's worker, say whether it
still runs, stop it, read its log. A runner keeps no state the manager needs: everything is in
the `ref` it returns, which the store keeps, so a restarted service can find (and stop) the
workers of the service before it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import rewardserve
from rewardserve.schemas.jobs import Resources

PACKAGE_ROOT = str(Path(rewardserve.__file__).resolve().parent.parent)
"""The folder holding this rewardserve package: first on a worker's PYTHONPATH, so it runs the
service's own code, not some other installed copy."""


def worker_pythonpath(existing: str | None) -> str:
    """`existing` with PACKAGE_ROOT in front (once: a path that already starts with it is kept)."""
    parts = [p for p in (existing or "").split(os.pathsep) if p]
    if parts[:1] == [PACKAGE_ROOT]:
        return os.pathsep.join(parts)
    return os.pathsep.join([PACKAGE_ROOT, *parts])


@dataclass(frozen=True)
class Launch:
    job_id: str
    attempt: int
    command: list[str]
    """The worker's argv: [python, -m, rewardserve.jobs.worker, ...]."""
    env: dict[str, str]
    """Added to the worker's environment (its API key, thread counts)."""
    resources: Resources
    log_path: Path
    """The worker's stdout and stderr (appended; one file over all attempts)."""
    cwd: Path | None = None


@dataclass(frozen=True)
class WorkerState:
    state: Literal["pending", "running", "exited", "gone"]
    """gone: the runner knows nothing of this ref (a worker of a previous service, reaped)."""
    exit_code: int | None = None
    reason: str | None = None
    """Why it ended, in words: 'killed by SIGKILL (out of memory?)', Ray's message..."""
    extra: dict[str, str] = field(default_factory=dict)


class Runner(Protocol):
    name: str

    def check(self, resources: Resources) -> None:
        """Raise InvalidArgument naming the field (resources.gpus, ...) when this runner cannot
        give a job what it asks; called at submission, before anything is stored."""

    async def launch(self, launch: Launch) -> str:
        """Start the worker; return its ref (local: 'pid:<pid>:<start time>', ray: the
        submission id)."""

    async def poll(self, ref: str) -> WorkerState: ...

    async def stop(self, ref: str, grace_s: float) -> None:
        """SIGTERM (or Ray's stop), then kill after grace_s; return once it is gone. A ref
        that is already gone is not an error."""

    async def logs(self, ref: str, log_path: Path) -> str:
        """The worker's output so far (local: the log file; ray: Ray's job logs)."""

    async def close(self) -> None: ...
