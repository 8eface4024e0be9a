"""Workers as child processes of the service, one process group each, niced.

The ref is `pid:<pid>:<start time>` (the start time is field 22 of /proc/<pid>/stat, in
clock ticks since boot): a service restarted after the old one died finds its predecessor's
workers by pid and start time together, so a pid the kernel has since given to another
process is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import time
from pathlib import Path

from rewardserve.jobs.runners.base import Launch, WorkerState
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.jobs import Resources

LOG_TAIL_BYTES = 1 << 20
_STOP_POLL_S = 0.05


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat; None when there is no such process (or a zombie that
    was reaped meanwhile)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19])  # field 3 is fields[0]


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw[raw.rindex(")") + 2 :].split()[0] in ("Z", "X")


def parse_ref(ref: str) -> tuple[int, int]:
    kind, pid, start = ref.split(":")
    if kind != "pid":
        raise ValueError(f"not a local runner ref: {ref!r}")
    return int(pid), int(start)


def exit_reason(returncode: int) -> str:
    """A process's end in words, as a job's error tells it."""
    if returncode == 0:
        return "exited with code 0"
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return "killed by SIGKILL (out of memory or kill -9?)"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class LocalRunner:
    name = "local"

    def __init__(self, nice: int = 10) -> None:
        self.nice = nice
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        """Our own children, by ref: polled (and reaped) through Popen."""

    def check(self, resources: Resources) -> None:
        if resources.gpus > 0:
            import torch

            have = torch.cuda.device_count()
            if resources.gpus > have:
                raise InvalidArgument(
                    f"resources.gpus={resources.gpus:g} but this machine has {have} CUDA "
                    "device(s) (the local runner cannot give more)",
                    field="resources.gpus",
                )
        cores = os.cpu_count() or 1
        if resources.cpus is not None and resources.cpus > cores:
            raise InvalidArgument(
                f"resources.cpus={resources.cpus:g} but this machine has {cores} cores",
                field="resources.cpus",
            )

    async def launch(self, launch: Launch) -> str:
        return await asyncio.to_thread(self._launch, launch)

    def _launch(self, launch: Launch) -> str:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | launch.env
        if launch.resources.gpus == 0 and "CUDA_VISIBLE_DEVICES" not in launch.env:
            env["CUDA_VISIBLE_DEVICES"] = ""  # as Ray does: no GPUs asked, none seen
        with open(launch.log_path, "ab") as log:
            log.write(
                f"==== attempt {launch.attempt} of {launch.job_id} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode()
            )
            log.flush()
            proc = subprocess.Popen(
                launch.command,
                env=env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its children
            )
        # Niced from here rather than by a preexec_fn: code run between fork and exec in
        # a process full of threads (torch, gRPC) can deadlock, and without one CPython
        # spawns with vfork. The worker's own children inherit the niceness.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            niceness = os.getpriority(os.PRIO_PROCESS, 0) + self.nice
            os.setpriority(os.PRIO_PROCESS, proc.pid, niceness)
        start = process_start_time(proc.pid)
        if start is None:  # already gone and reaped? Popen keeps the zombie until poll
            start = 0
        ref = f"pid:{proc.pid}:{start}"
        self._procs[ref] = proc
        return ref

    async def poll(self, ref: str) -> WorkerState:
        proc = self._procs.get(ref)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return WorkerState("running")
            return WorkerState("exited", exit_code=code, reason=exit_reason(code))
        pid, start = parse_ref(ref)
        if process_start_time(pid) == start and not _is_zombie(pid):
            return WorkerState("running")
        # Not our child (a previous service's) and gone: how it ended is not ours to know.
        return WorkerState("gone", reason="the worker process is gone (exit status unknown)")

    def _alive(self, ref: str) -> bool:
        proc = self._procs.get(ref)
        if proc is not None:
            return proc.poll() is None
        pid, start = parse_ref(ref)
        return process_start_time(pid) == start and not _is_zombie(pid)

    async def stop(self, ref: str, grace_s: float) -> None:
        pid, _ = parse_ref(ref)
        ours = ref in self._procs
        if not self._alive(ref) and not ours:
            return  # a previous service's worker that is gone: its pid may be reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._alive(ref) and time.monotonic() < deadline:
            await asyncio.sleep(_STOP_POLL_S)
        if self._alive(ref) or ours:
            # Past the grace, or children our worker left in its group (the group id stays
            # reserved while any member lives, so this reaches only them).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            while self._alive(ref):
                await asyncio.sleep(_STOP_POLL_S)

    async def logs(self, ref: str, log_path: Path) -> str:
        return await asyncio.to_thread(read_tail, log_path, LOG_TAIL_BYTES)

    def forget(self, ref: str) -> None:
        """Drop an ended worker's Popen (after its exit was seen)."""
        proc = self._procs.pop(ref, None)
        if proc is not None:
            proc.poll()

    async def close(self) -> None:
        # Workers outlive the service on purpose (the next start stops and restarts them);
        # only the Popen handles go.
        self._procs.clear()


def read_tail(path: Path, tail_bytes: int | None) -> str:
    """The last `tail_bytes` of a file (all of it when None) as text; '' when it is absent."""
    try:
        with open(path, "rb") as f:
            if tail_bytes is not None:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


def threads_for(resources: Resources, default: int) -> int:
    """Torch threads of a worker: its CPUs rounded up, else the service's default."""
    return max(1, math.ceil(resources.cpus)) if resources.cpus is not None else default
