"""Runs each attempt of a job as a Ray job through Ray's job submission API (the dashboard
address, --ray-address). Import this module only for --job-runner ray: ray is an extra.

The worker is the same entrypoint the local runner starts; Ray runs it as the job's driver on
one node. Nothing is uploaded: the data directory (checkpoints, metrics, prompts files), the
model repository, this checkout (put on the worker's PYTHONPATH) and the interpreter named in
the command must be on a filesystem every Ray node shares at the same paths, as OpenRLHF and
verl expect shared storage for checkpoints.

Stop: Ray's supervisor sends the entrypoint and its children SIGTERM, waits
RAY_JOB_STOP_WAIT_TIME_S (read from the supervisor's environment, default 3, whole seconds),
then SIGKILLs them (RAY_JOB_STOP_SIGNAL may make the first signal SIGINT). The supervisor's
runtime_env is the job's, so launch sets RAY_JOB_STOP_WAIT_TIME_S from --job-stop-grace-s
per job; nothing has to be configured on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_nodes

from rewardserve.config import Settings
from rewardserve.jobs.runners.base import Launch, WorkerState, worker_pythonpath
from rewardserve.schemas.errors import InvalidArgument, Unavailable
from rewardserve.schemas.jobs import Resources

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_S = 30.0
"""Ray's client sets no HTTP timeout; a dashboard that hangs must not hang the manager."""
NODES_TTL_S = 30.0
"""How long check() trusts the cluster's node list (poll refreshes it off the event loop)."""
NODES_TIMEOUT_S = 3
"""check() is synchronous: when it has to fetch the node list, it waits at most this long."""
STOP_SLACK_S = 10.0
"""stop(): time past the grace for Ray to kill the entrypoint and record STOPPED."""
REASON_CHARS = 300
"""Ray's failure message carries the log tail; the reason keeps its first line, this long."""

_SIGNALS = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV", 2: "SIGINT"}


def submission_id(job_id: str, attempt: int) -> str:
    return f"rewardserve-{job_id}-a{attempt}"


def _log_header(ref: str) -> str:
    return f"=== ray job {ref} ===\n"


class RayRunner:
    name = "ray"

    def __init__(self, settings: Settings) -> None:
        # None: Ray's own lookup (RAY_ADDRESS, then a local cluster).
        self._address = settings.ray_address
        self._settings = settings
        self._client: JobSubmissionClient | None = None
        self._nodes: list[dict[str, float]] | None = None
        self._nodes_at = -math.inf
        self._refreshing = False
        self._log_paths: dict[str, Path] = {}
        """Attempts launched by this process whose Ray log is copied into their log file
        once they end; a best effort (a restarted service reads Ray's logs instead)."""

    # -- Ray calls (synchronous HTTP, run in a thread) --------------------------------------

    def _connect(self) -> JobSubmissionClient:
        if self._client is None:
            try:
                # The constructor checks the connection and Ray's version.
                self._client = JobSubmissionClient(self._address)
            except (ConnectionError, requests.RequestException) as exc:
                raise Unavailable(
                    f"Ray is unreachable at {self._address or '$RAY_ADDRESS'}: {exc}"
                ) from exc
        return self._client

    async def _call(self, fn: Callable[[JobSubmissionClient], T]) -> T:
        def run() -> T:
            try:
                return fn(self._connect())
            except (ConnectionError, requests.RequestException) as exc:
                raise Unavailable(f"Ray is unreachable at {self._address}: {exc}") from exc

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), CALL_TIMEOUT_S)
        except TimeoutError as exc:
            raise Unavailable(
                f"Ray at {self._address} did not answer in {CALL_TIMEOUT_S:.0f} s"
            ) from exc

    # -- check -----------------------------------------------------------------------------

    def _fetch_nodes(self) -> list[dict[str, float]] | None:
        try:
            nodes = list_nodes(
                address=self._address,
                filters=[("state", "=", "ALIVE")],
                timeout=NODES_TIMEOUT_S,
                raise_on_missing_output=False,
            )
        except Exception as exc:
            log.warning("ray: cannot read the cluster's nodes (%s); not checking resources", exc)
            return None
        finally:
            self._refreshing = False
        self._nodes = [dict(node.resources_total) for node in nodes]
        self._nodes_at = time.monotonic()
        return self._nodes

    def _fresh(self) -> bool:
        return time.monotonic() - self._nodes_at < NODES_TTL_S

    def check(self, resources: Resources) -> None:
        """Refuse what no live node of the cluster has: the entrypoint is one process on one
        node, so the largest node bounds it, not the cluster's sum. An unreachable cluster
        is not refused here: launch reports it. An autoscaling cluster whose larger node
        types have no node up yet is refused too (they are not in the node list)."""
        nodes = self._nodes if self._fresh() else self._fetch_nodes()
        if not nodes:
            return
        asked = [
            ("resources.gpus", "GPU", resources.gpus, 1.0, "GPUs"),
            # No cpus: launch asks --job-torch-threads, which a node must have too.
            (
                "resources.cpus",
                "CPU",
                resources.cpus or self._settings.job_torch_threads,
                1.0,
                "CPUs",
            ),
            ("resources.memory_gib", "memory", resources.memory_gib or 0.0, 2**30, "GiB"),
        ]
        for field, key, want, unit, words in asked:
            most = max(node.get(key, 0.0) for node in nodes) / unit
            if want > most + 1e-9:
                raise InvalidArgument(
                    f"asks {want:g} {words}; the largest node of the Ray cluster at "
                    f"{self._address} has {most:g}",
                    field=field,
                )

    # -- launch / poll / stop / logs ----------------------------------------------------------

    def _runtime_env(self, launch: Launch) -> dict[str, Any]:
        env = dict(launch.env)
        env["PYTHONPATH"] = worker_pythonpath(env.get("PYTHONPATH"))
        if launch.resources.gpus == 0:
            # As the local runner: no GPUs asked, none seen. Ray sets it only for an
            # entrypoint given GPUs; without, the worker would see every GPU of its node.
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        # Read by Ray's job supervisor (whose runtime_env this is too): SIGKILL after it.
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(math.ceil(self._settings.job_stop_grace_s)))
        return {"env_vars": env}

    def _entrypoint(self, launch: Launch) -> str:
        # exec: the worker itself is Ray's child, so the stop signal reaches it first hand.
        command = "exec " + shlex.join(launch.command)
        return f"cd {shlex.quote(str(launch.cwd))} && {command}" if launch.cwd else command

    async def launch(self, launch: Launch) -> str:
        ref = submission_id(launch.job_id, launch.attempt)
        res = launch.resources

        def submit(client: JobSubmissionClient) -> str:
            try:
                return client.submit_job(
                    entrypoint=self._entrypoint(launch),
                    submission_id=ref,
                    runtime_env=self._runtime_env(launch),
                    entrypoint_num_cpus=res.cpus or self._settings.job_torch_threads,
                    entrypoint_num_gpus=res.gpus or None,
                    entrypoint_memory=int(res.memory_gib * 2**30) if res.memory_gib else None,
                    metadata={"rewardserve_job": launch.job_id, "attempt": str(launch.attempt)},
                )
            except RuntimeError as exc:
                # This attempt was submitted already (a launch retried after a lost answer):
                # it is this attempt's job, whatever became of it.
                if "already exists" in str(exc):
                    return ref
                raise Unavailable(f"Ray refused job {ref}: {_first_line(exc)}") from exc

        ref = await self._call(submit)
        self._log_paths[ref] = launch.log_path
        return ref

    async def poll(self, ref: str) -> WorkerState:
        """Unavailable when Ray cannot be asked: the worker's fate is unknown, not ended."""
        if not self._fresh() and not self._refreshing:
            # Keeps check() from waiting on the network at submission.
            self._refreshing = True
            asyncio.get_running_loop().run_in_executor(None, self._fetch_nodes)
        try:
            info = await self._call(lambda client: client.get_job_info(ref))
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                self._log_paths.pop(ref, None)
                return WorkerState("gone", reason=f"Ray has no job {ref}")
            raise Unavailable(f"Ray: cannot read job {ref}: {_first_line(exc)}") from exc
        status = info.status
        extra = {"ray_status": str(status.value)}
        if info.error_type:
            extra["ray_error_type"] = str(info.error_type)
        if status == JobStatus.PENDING:
            return WorkerState("pending", extra=extra)
        if status == JobStatus.RUNNING:
            return WorkerState("running", extra=extra)
        code = getattr(info, "driver_exit_code", None)
        if code is not None:
            extra["driver_exit_code"] = str(code)
        await self._mirror(ref)
        return WorkerState(
            "exited",
            exit_code=0 if status == JobStatus.SUCCEEDED else 1,
            reason=_reason(status, info.message, code),
            extra=extra,
        )

    async def stop(self, ref: str, grace_s: float) -> None:
        try:
            await self._call(lambda client: client.stop_job(ref))
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return
            raise Unavailable(f"Ray: cannot stop job {ref}: {_first_line(exc)}") from exc
        deadline = time.monotonic() + grace_s + STOP_SLACK_S
        while time.monotonic() < deadline:
            if (await self.poll(ref)).state in ("exited", "gone"):
                return
            await asyncio.sleep(0.25)
        log.warning("ray: job %s still not stopped %.0f s after stop_job", ref, grace_s)

    async def logs(self, ref: str, log_path: Path) -> str:
        """The log file (earlier attempts, copied from Ray when they ended), then this
        attempt's log from Ray unless the file holds it already."""
        text = await asyncio.to_thread(_read, log_path)
        if _log_header(ref) in text:
            return text
        try:
            live = await self._call(lambda client: client.get_job_logs(ref))
        except (RuntimeError, Unavailable) as exc:
            log.warning("ray: no logs for %s: %s", ref, _first_line(exc))
            return text
        return text + _log_header(ref) + live

    async def _mirror(self, ref: str) -> None:
        path = self._log_paths.pop(ref, None)
        if path is None:
            return
        try:
            text = await self._call(lambda client: client.get_job_logs(ref))
        except (RuntimeError, Unavailable) as exc:
            log.warning("ray: cannot copy the log of %s: %s", ref, _first_line(exc))
            return
        await asyncio.to_thread(_append, path, _log_header(ref) + text)

    async def close(self) -> None:
        # Ray's client holds no connection; the jobs run on (the manager stops what it must).
        self._client = None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:REASON_CHARS] if text else type(exc).__name__


def _reason(status: JobStatus, message: str | None, code: int | None) -> str:
    if status == JobStatus.SUCCEEDED:
        return "exited with 0"
    if status == JobStatus.STOPPED:
        return "stopped through Ray"
    if code is not None and code < 0:
        sig = _SIGNALS.get(-code, f"signal {-code}")
        return f"killed by {sig}" + (" (out of memory?)" if code == -9 else "")
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    # Ray's message goes on with "last available logs ...": the first clause is the reason.
    first = first.split(", last available logs")[0]
    return (first or f"Ray job {status.value}")[:REASON_CHARS]
