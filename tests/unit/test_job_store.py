"""The job store on a real SQLite file: round trips, keyset pages, one transaction per change,
and a writer killed with SIGKILL mid-loop leaving a readable file of whole rows."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rewardserve.jobs.store import JobStore, now
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.jobs import Job, Resources

SERVICE = Path(__file__).resolve().parents[2] / "service"


def make_job(i: int, *, type_: str = "ppo", key: str | None = None) -> Job:
    return Job(
        id=f"job-{i:012x}",
        type=type_,
        status="queued",
        created_at=now(),
        config={"total_steps": 5, "i": i},
        resources=Resources(cpus=1.5),
        total_steps=5,
        idempotency_key=key,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_round_trip_and_status_event(store: JobStore, tmp_path: Path) -> None:
    rec, event, created = store.insert(make_job(1), request_hash="h1")
    assert created and event is not None
    assert event.type == "status" and event.data == {"status": "queued"}
    got = store.get("job-000000000001")
    assert got is not None and got.job == rec.job
    assert got.job.resources.cpus == 1.5 and got.job.config["i"] == 1
    assert got.request_hash == "h1" and not got.resume and got.runner_ref is None

    rec, events = store.update(
        rec.job.id,
        {"status": "running", "attempt": 1, "runner_ref": "pid:1:2", "resume": True},
        [("status", {"status": "running"})],
    )
    assert rec.job.status == "running" and rec.job.attempt == 1
    assert rec.runner_ref == "pid:1:2" and rec.resume
    assert [e.id for e in store.events_after(rec.job.id)] == [event.id, events[0].id]
    assert store.events_after(rec.job.id, after=event.id) == events
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")  # durable across connections
    assert reopened.get(rec.job.id) == rec
    reopened.close()


def test_update_of_unknown_fields_or_jobs_is_refused(store: JobStore) -> None:
    store.insert(make_job(1))
    with pytest.raises(ValueError, match="not updatable"):
        store.update("job-000000000001", {"id": "x"})
    with pytest.raises(KeyError):
        store.update("job-nope", {"status": "failed"}, [("status", {"status": "failed"})])
    assert store.events_after("job-nope") == []  # the failed update appended nothing


def test_idempotency_key_is_unique(store: JobStore) -> None:
    first, _, created = store.insert(make_job(1, key="k"), request_hash="a")
    again, event, created_again = store.insert(make_job(2, key="k"), request_hash="b")
    assert created and not created_again and event is None
    assert again.job.id == first.job.id and again.request_hash == "a"
    assert store.get("job-000000000002") is None
    assert store.get_by_key("k") == first and store.get_by_key("other") is None


def test_keyset_pagination_filters_and_bad_tokens(store: JobStore) -> None:
    for i in range(1, 8):
        store.insert(make_job(i, type_="ppo" if i % 2 else "reward"))
    store.update("job-000000000003", {"status": "failed"})
    seen, token = [], None
    while True:
        page = store.list(limit=3, page_token=token)
        seen += [j.id for j in page.data]
        token = page.next_page_token
        if token is None:
            break
        store.insert(make_job(100 + len(seen)))  # new jobs neither repeat nor shift pages
    assert seen == [f"job-{i:012x}" for i in range(7, 0, -1)]
    assert [j.id for j in store.list(type="reward").data] == [f"job-{i:012x}" for i in (6, 4, 2)]
    failed = store.list(status=["failed"], type="ppo")
    assert [j.id for j in failed.data] == ["job-000000000003"] and failed.next_page_token is None
    queued = store.list(limit=100, status=["queued"])
    assert len(queued.data) == 8 and queued.next_page_token is None
    for bad in ("nonsense", "e30", "!!!"):
        with pytest.raises(InvalidArgument) as err:
            store.list(page_token=bad)
        assert err.value.field == "page_token"


def test_steps_and_checkpoints_redone_after_a_resume(store: JobStore) -> None:
    job_id = store.insert(make_job(1))[0].job.id
    for step in range(1, 6):
        store.record_step(job_id, step, {"reward": float(step)}, [])
    store.record_checkpoint(job_id, 2, "/ckpt/2")
    store.record_checkpoint(job_id, 4, "/ckpt/4")
    # The worker died after step 5 and resumed from the checkpoint of step 2: step 3 again.
    rec, event = store.record_step(job_id, 3, {"reward": 30.0}, [{"prompt": "p"}])
    assert [m["step"] for m in store.metrics(job_id)] == [1, 2, 3]
    assert store.metrics(job_id)[-1] == {"reward": 30.0, "step": 3}
    assert [c.step for c in rec.job.checkpoints] == [2]
    assert rec.job.step == 3 and rec.job.metrics == {"reward": 30.0}
    assert event.data == {"step": 3, "metrics": {"reward": 30.0}, "samples": [{"prompt": "p"}]}
    store.put_metrics(job_id, 3, {"reward": 31.0})
    store.put_metrics(job_id, 4, {"reward": 4.0})
    store.drop_after(job_id, 3)
    assert store.metrics(job_id)[-1] == {"reward": 31.0, "step": 3}


def test_a_checkpoint_with_keep_forgets_all_but_the_newest(store: JobStore) -> None:
    job_id = store.insert(make_job(1))[0].job.id
    for step in (1, 2):
        store.record_checkpoint(job_id, step, f"/ckpt/{step}", keep=2)
    rec, event = store.record_checkpoint(job_id, 3, "/ckpt/3", keep=2)
    # The trainer deleted step-1's folder when it saved step 3: the job must not list it.
    assert [(c.step, c.path) for c in rec.job.checkpoints] == [(2, "/ckpt/2"), (3, "/ckpt/3")]
    assert event.data == {"step": 3, "path": "/ckpt/3"}
    rec, _ = store.record_checkpoint(job_id, 4, "/ckpt/4")  # no keep: every one stays
    assert [c.step for c in rec.job.checkpoints] == [2, 3, 4]


def test_by_status_is_in_submission_order(store: JobStore) -> None:
    for i in (5, 1, 3):
        store.insert(make_job(i))
    store.update("job-000000000001", {"status": "running"})
    assert [r.job.id for r in store.by_status(["queued"])] == [
        "job-000000000005",
        "job-000000000003",
    ]
    assert store.count("running") == 1 and store.count("queued") == 2


WRITER = """
import sys
from rewardserve.jobs.store import JobStore, now
from rewardserve.schemas.jobs import Job, Resources
store = JobStore(__import__("pathlib").Path(sys.argv[1]))
i = 0
while True:
    i += 1
    job = Job(id=f"job-{i:012x}", type="ppo", status="queued", created_at=now(),
              config={"pad": "x" * 2000}, resources=Resources(), total_steps=3)
    store.insert(job)
    store.update(job.id, {"status": "running", "step": 1}, [("status", {"status": "running"})])
    store.record_step(job.id, 1, {"reward": 1.0, "pad": "y" * 4000}, [])
    if i == 20:
        print("ready", flush=True)
"""


def test_a_writer_killed_mid_loop_leaves_whole_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    env = os.environ | {"PYTHONPATH": str(SERVICE)}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(path)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.3)  # mid-loop, somewhere in a transaction or between two
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = JobStore(path)
    jobs = store.list(limit=200).data
    assert len(jobs) >= 20
    for job in jobs:
        events = store.events_after(job.id)
        # Each change is whole: the status and its event, the step with its metrics row.
        assert events[0].data == {"status": "queued"}
        if job.status == "running":
            assert events[1].data == {"status": "running"}
        else:
            assert job.status == "queued" and len(events) == 1
        if job.metrics is not None:
            assert store.metrics(job.id) == [{**job.metrics, "step": 1}]
            assert events[-1].type == "step"
        else:
            assert store.metrics(job.id) == []
    store.close()
