"""A local Ray head for tests, owned by the test session that starts it:

    with RayHead(num_cpus=2) as head:
        JobSubmissionClient(head.address)

`ray start --head --block` runs in its own process group; stop() kills that group (SIGTERM,
then SIGKILL), then the head's processes that left it (Ray gives workers and job entrypoints
their own sessions): workers name its temp dir on their command lines, job drivers (which
would outlive the head a while) have its GCS address as RAY_ADDRESS. Never `ray stop`: that
stops every Ray on the machine, anyone's. Importing this module does not import ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from servers import free_ports

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 3.0


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_naming(marker: str) -> list[int]:
    """Pids whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def processes_with_env(name: str, value_suffix: str) -> list[int]:
    """Pids whose environment has `name` set to a value ending with `value_suffix`."""
    pids = []
    prefix = f"{name}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(prefix) and v.endswith(value_suffix.encode()) for v in environ):
            pids.append(int(entry.name))
    return pids


class RayHead:
    """A context manager; `address` is the dashboard's (job submission) URL."""

    def __init__(self, num_cpus: int = 2, object_store_bytes: int = 100_000_000) -> None:
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.temp_dir: Path | None = None
        self.address = ""
        self.gcs_port = 0
        self.started_in_s = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = None

    def log_tail(self, chars: int = 3000) -> str:
        assert self.temp_dir is not None
        try:
            return (self.temp_dir / "head.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> RayHead:
        from ray.job_submission import JobSubmissionClient

        # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must
        # fit in 107 bytes, which pytest's tmp_path does not.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rsray-", dir="/tmp"))
        gcs, dashboard, client, agent = free_ports(4)
        self.gcs_port = gcs
        ray_cli = Path(sys.executable).with_name("ray")
        args = [
            str(ray_cli), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={gcs}", f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        self._out = open(self.temp_dir / "head.log", "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            args, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.address = f"http://127.0.0.1:{dashboard}"
        while True:
            try:
                JobSubmissionClient(self.address).list_jobs()
                break
            except Exception:
                code = self.proc.poll()
                if code is not None or time.monotonic() - started > START_TIMEOUT_S:
                    tail = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"the Ray head did not start (rc {code}):\n{tail}") from None
                time.sleep(0.25)
        self.started_in_s = time.monotonic() - started
        print(f"\nray head ready in {self.started_in_s:.1f} s", file=sys.stderr)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self.temp_dir is not None:
            strays = processes_naming(str(self.temp_dir))
            strays += processes_with_env("RAY_ADDRESS", f":{self.gcs_port}")
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
