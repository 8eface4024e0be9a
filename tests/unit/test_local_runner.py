"""LocalRunner with real child processes: exit reasons, the log, stop of the whole process
group within the grace, niceness, refs fenced by start time, and what it refuses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from rewardserve.jobs.runners.base import Launch
from rewardserve.jobs.runners.local import (
    LocalRunner,
    exit_reason,
    parse_ref,
    process_start_time,
)
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.jobs import Resources


def launch(tmp_path: Path, code: str, **env: str) -> Launch:
    return Launch(
        job_id="job-000000000001",
        attempt=1,
        command=[sys.executable, "-c", code],
        env=env,
        resources=Resources(),
        log_path=tmp_path / "job" / "worker.log",
    )


async def wait_ended(runner: LocalRunner, ref: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await runner.poll(ref)
        if state.state in ("exited", "gone"):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"{ref} still runs")


async def test_exit_code_env_log_and_niceness(tmp_path: Path) -> None:
    runner = LocalRunner(nice=5)
    code = (
        "import os, sys; print('hello', os.environ['GREETING'], os.nice(0), "
        "repr(os.environ['CUDA_VISIBLE_DEVICES'])); sys.exit(3)"
    )
    ref = await runner.launch(launch(tmp_path, code, GREETING="hi"))
    assert parse_ref(ref)[1] > 0  # its start time was read
    state = await wait_ended(runner, ref)
    assert (state.state, state.exit_code, state.reason) == ("exited", 3, "exited with code 3")
    base = os.nice(0)
    log = await runner.logs(ref, tmp_path / "job" / "worker.log")
    assert "==== attempt 1 of job-000000000001" in log
    assert f"hello hi {min(19, base + 5)} ''" in log
    # A second attempt appends to the same log.
    ref2 = await runner.launch(launch(tmp_path, "print('again')"))
    assert (await wait_ended(runner, ref2)).exit_code == 0
    log = await runner.logs(ref2, tmp_path / "job" / "worker.log")
    assert log.index("hello hi") < log.index("again")


async def test_kill_9_is_named(tmp_path: Path) -> None:
    runner = LocalRunner(nice=0)
    ref = await runner.launch(launch(tmp_path, "import time; time.sleep(60)"))
    assert (await runner.poll(ref)).state == "running"
    os.kill(parse_ref(ref)[0], signal.SIGKILL)
    state = await wait_ended(runner, ref)
    assert state.exit_code == -9
    assert state.reason == "killed by SIGKILL (out of memory or kill -9?)"
    assert exit_reason(-signal.SIGTERM) == "killed by SIGTERM"


GROUP = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'stubborn' else signal.SIG_DFL)
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
async def test_stop_ends_the_process_group_within_the_grace(tmp_path: Path, mode: str) -> None:
    runner = LocalRunner(nice=0)
    spec = launch(tmp_path, GROUP)
    spec = Launch(**{**spec.__dict__, "command": [*spec.command, mode]})
    ref = await runner.launch(spec)
    log = tmp_path / "job" / "worker.log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(log.read_text().splitlines()) < 2:
        await asyncio.sleep(0.05)
    grandchild = int(log.read_text().splitlines()[1])
    t0 = time.monotonic()
    await runner.stop(ref, grace_s=1.0)
    took = time.monotonic() - t0
    state = await runner.poll(ref)
    assert state.state == "exited"
    if mode == "polite":
        assert took < 1.0 and state.exit_code == -signal.SIGTERM
    else:  # ignores SIGTERM: killed once the grace is over
        assert 1.0 <= took < 5.0 and state.exit_code == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while process_start_time(grandchild) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the grandchild is init's now, reaped once it is killed
    assert process_start_time(grandchild) is None


async def test_a_previous_services_refs(tmp_path: Path) -> None:
    """A ref the runner did not launch (the service restarted) is checked by pid and start
    time: alive while both match, gone after, and a reused pid is never signalled."""
    first = LocalRunner(nice=0)
    ref = await first.launch(launch(tmp_path, "import time; time.sleep(60)"))
    pid, start = parse_ref(ref)
    second = LocalRunner(nice=0)  # knows nothing of the first one's Popen
    assert (await second.poll(ref)).state == "running"
    stale = f"pid:{pid}:{start + 1}"  # same pid, another process start: a reused pid
    assert (await second.poll(stale)).state == "gone"
    await second.stop(stale, grace_s=0.1)  # a no-op: nothing of ours to signal
    assert (await second.poll(ref)).state == "running"
    await second.stop(ref, grace_s=2.0)
    state = await first.poll(ref)  # the first one (the parent) sees how it ended
    assert state.exit_code == -signal.SIGTERM
    assert (await second.poll(ref)).state == "gone"
    assert "exit status unknown" in (await second.poll(ref)).reason


def test_check_refuses_what_this_machine_lacks() -> None:
    import torch

    runner = LocalRunner()
    runner.check(Resources(cpus=1))
    with pytest.raises(InvalidArgument) as err:
        runner.check(Resources(gpus=torch.cuda.device_count() + 1))
    assert err.value.field == "resources.gpus"
    with pytest.raises(InvalidArgument) as err:
        runner.check(Resources(cpus=(os.cpu_count() or 1) + 1))
    assert err.value.field == "resources.cpus"


def test_worker_pythonpath_puts_the_checkout_first_once() -> None:
    from rewardserve.jobs.runners.base import PACKAGE_ROOT, worker_pythonpath

    assert worker_pythonpath(None) == PACKAGE_ROOT
    assert worker_pythonpath("/x") == os.pathsep.join([PACKAGE_ROOT, "/x"])
    # the manager's env already holds it; the Ray runner's pass must not add it again
    once = worker_pythonpath("/x")
    assert worker_pythonpath(once) == once
