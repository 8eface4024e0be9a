"""The worker's REST client against a fake of the service's jobs API (tests/jobs_api.py):
retries through connection failures and 5xx, Superseded on 409, a refusal for good on
other 4xx, reports validated and NaN-free."""

from __future__ import annotations

import math
import time

import pytest

from jobs_api import FakeJobsAPI
from rewardserve.jobs.reporter import JobReporter, ReportError, Superseded
from servers import free_port

JOB = {"id": "job-0123456789ab", "type": "ppo", "config": {}, "total_steps": 2, "attempt": 1}


def test_get_and_report_with_retries_through_5xx() -> None:
    with FakeJobsAPI(JOB) as api:
        rep = JobReporter(api.url, JOB["id"], attempt=3, api_key="k", retry_s=10)
        api.answers = [503, 500]
        assert rep.get_job() == JOB
        assert api.requests == 3
        rep.report("step", step=1, metrics={"loss": math.nan, "lr": 0.1}, samples=[])
        rep.close()
    (body,) = api.reports
    assert body["attempt"] == 3 and body["kind"] == "step" and body["step"] == 1
    assert body["metrics"] == {"loss": None, "lr": 0.1}  # NaN is no JSON: sent as null
    assert body["_auth"] == "Bearer k"


def test_409_is_superseded_and_other_4xx_fail_at_once() -> None:
    with FakeJobsAPI(JOB) as api:
        rep = JobReporter(api.url, JOB["id"], attempt=1, retry_s=10)
        api.answers = [409]
        with pytest.raises(Superseded):
            rep.report("started", total_steps=2)
        api.answers = [422]
        started = time.monotonic()
        with pytest.raises(ReportError, match="HTTP 422"):
            rep.report("started", total_steps=2)
        assert time.monotonic() - started < 1  # not retried
        rep.close()
    assert api.reports == []


def test_unreachable_service_gives_up_after_the_retry_window() -> None:
    rep = JobReporter(f"http://127.0.0.1:{free_port()}", JOB["id"], attempt=1, retry_s=1.5)
    started = time.monotonic()
    with pytest.raises(ReportError, match="no answer within"):
        rep.get_job()
    assert 1.5 <= time.monotonic() - started < 5
    rep.close()


def test_a_bad_report_is_refused_before_it_is_sent() -> None:
    rep = JobReporter("http://127.0.0.1:9", JOB["id"], attempt=1)
    with pytest.raises(ValueError):
        rep.report("exploded")
    rep.close()
