"""RayRunner against a real local Ray head (tests/ray_head.py, the session's `ray_head`
fixture: its own process group, killed at teardown, never `ray stop`). The entrypoints
are small `python -c` scripts; the real worker's Ray run is the jobs end-to-end test."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")


from ray.job_submission import JobSubmissionClient

from ray_head import RayHead
from rewardserve.config import Settings
from rewardserve.jobs.runners.base import Launch, WorkerState
from rewardserve.jobs.runners.ray import RayRunner, submission_id
from rewardserve.schemas.errors import InvalidArgument, Unavailable
from rewardserve.schemas.jobs import Resources
from servers import free_port

GRACE_S = 1.0


@pytest.fixture
def runner(ray_head: RayHead, tmp_path: Path) -> RayRunner:
    return RayRunner(
        Settings(
            job_runner="ray",
            ray_address=ray_head.address,
            data_dir=tmp_path,
            job_stop_grace_s=GRACE_S,
        )
    )


def _launch(tmp_path: Path, script: str, attempt: int = 1, **kw: object) -> Launch:
    job_id = "job-" + os.urandom(6).hex()
    return Launch(
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-c", script],
        env=kw.pop("env", {}),  # type: ignore[arg-type]
        resources=kw.pop("resources", Resources()),  # type: ignore[arg-type]
        log_path=tmp_path / "jobs" / job_id / "worker.log",
        **kw,  # type: ignore[arg-type]
    )


async def _until_exited(runner: RayRunner, ref: str, timeout: float = 60) -> list[WorkerState]:
    seen: list[WorkerState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await runner.poll(ref)
        seen.append(state)
        if state.state in ("exited", "gone"):
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"{ref} did not end in {timeout} s: {seen[-1]}")


async def test_runs_to_success_with_env_cwd_checkout_and_logs(
    runner: RayRunner, tmp_path: Path
) -> None:
    script = (
        "import os, rewardserve; print('hello from ray', os.environ['FOO'], os.getcwd(),"
        " rewardserve.__file__)"
    )
    launch = _launch(tmp_path, script, attempt=2, env={"FOO": "bar-42"}, cwd=tmp_path)
    ref = await runner.launch(launch)
    assert ref == submission_id(launch.job_id, 2) == f"rewardserve-{launch.job_id}-a2"
    seen = await _until_exited(runner, ref)

    assert {s.state for s in seen[:-1]} <= {"pending", "running"}
    final = seen[-1]
    assert (final.state, final.exit_code) == ("exited", 0), final
    logs = await runner.logs(ref, launch.log_path)
    line = next(line for line in logs.splitlines() if line.startswith("hello from ray"))
    _, _, _, foo, cwd, module = line.split()
    assert foo == "bar-42"
    assert Path(cwd) == tmp_path
    # The entrypoint imports the service's own checkout (PYTHONPATH), not an installed copy.
    import rewardserve

    assert Path(module) == Path(rewardserve.__file__)
    # Once it ended, its Ray log is copied into the job's log file, once.
    assert "hello from ray" in launch.log_path.read_text()
    assert await runner.logs(ref, launch.log_path) == launch.log_path.read_text()
    info = JobSubmissionClient(runner._address).get_job_info(ref)
    assert info.metadata == {"rewardserve_job": launch.job_id, "attempt": "2"}
    # A launch retried for the same attempt gets the same job, not a second one.
    assert await runner.launch(launch) == ref


async def test_nonzero_exit_is_exit_code_1_with_ray_reason(
    runner: RayRunner, tmp_path: Path
) -> None:
    launch = _launch(tmp_path, "import sys; print('about to fail'); sys.exit(3)")
    ref = await runner.launch(launch)
    final = (await _until_exited(runner, ref))[-1]
    assert (final.state, final.exit_code) == ("exited", 1), final
    assert final.reason and "exit code 3" in final.reason and "logs" not in final.reason
    assert final.extra["driver_exit_code"] == "3"
    assert final.extra["ray_status"] == "FAILED"
    assert "about to fail" in await runner.logs(ref, launch.log_path)


async def test_stop_terminates_then_kills_after_the_grace(
    runner: RayRunner, tmp_path: Path
) -> None:
    polite = _launch(
        tmp_path,
        "import signal, sys, time\n"
        "def bye(*_): print('got SIGTERM', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye); print('up', flush=True); time.sleep(120)",
    )
    stubborn = _launch(
        tmp_path,
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)",
    )
    refs = [await runner.launch(polite), await runner.launch(stubborn)]
    for ref, launch in zip(refs, (polite, stubborn), strict=True):
        deadline = time.monotonic() + 60
        while "up" not in (await runner.logs(ref, launch.log_path)).split():
            assert time.monotonic() < deadline, await runner.poll(ref)
            await asyncio.sleep(0.2)

    for ref in refs:
        started = time.monotonic()
        await runner.stop(ref, GRACE_S)
        took = time.monotonic() - started
        state = await runner.poll(ref)
        assert state.state == "exited" and state.extra["ray_status"] == "STOPPED", state
        assert state.exit_code == 1 and state.reason == "stopped through Ray"
        # Ray's own wait before SIGKILL is 3 s; the runner set it to the grace.
        assert took < GRACE_S + 1.9, took
    assert "got SIGTERM" in await runner.logs(refs[0], polite.log_path)
    await runner.stop(refs[1], GRACE_S)  # stopping what has ended is no error


async def test_unknown_ref_is_gone(runner: RayRunner, tmp_path: Path) -> None:
    ref = submission_id("job-000000000000", 9)
    state = await runner.poll(ref)
    assert state.state == "gone"
    await runner.stop(ref, GRACE_S)
    assert await runner.logs(ref, tmp_path / "none.log") == ""


def test_check_refuses_what_no_node_has(runner: RayRunner, ray_head: RayHead) -> None:
    runner.check(Resources(cpus=2))
    runner.check(Resources(cpus=0.5, memory_gib=0.5))
    threads4 = RayRunner(
        Settings(job_runner="ray", ray_address=ray_head.address, job_torch_threads=4)
    )
    for who, resources, field in [
        (runner, Resources(gpus=1), "resources.gpus"),
        (runner, Resources(cpus=3), "resources.cpus"),
        (runner, Resources(memory_gib=4000), "resources.memory_gib"),
        # No cpus: launch would ask --job-torch-threads (4) of the 2-CPU node.
        (threads4, Resources(), "resources.cpus"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            who.check(resources)
        assert err.value.field == field


async def test_unreachable_ray_is_unavailable_at_launch(tmp_path: Path) -> None:
    runner = RayRunner(Settings(job_runner="ray", ray_address=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(Unavailable, match="unreachable"):
        await runner.launch(_launch(tmp_path, "print(1)"))
    runner.check(Resources(gpus=8))  # cannot tell: left to launch
    await runner.close()
