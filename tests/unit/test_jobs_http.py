"""/v1/jobs over REST against a fake JobManager (tests/jobs_fake.py): every route's statuses,
the wire formats (CSV, SSE, PNG, text), admin scope, malformed requests, jobs disabled.

The manager here is a spec'd in-memory fake that the test drives (emits events, flips
statuses), so each transport's wire format is checked on its own; the real manager with real
workers is tested through both transports in tests/integration/test_jobs_api.py.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import matplotlib.image
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobs_fake import ADMIN_KEY, SCORE_KEY, FakeJobManager, fake_runtime
from rewardserve.config import Settings
from rewardserve.http.app import build_app
from rewardserve.http.routers import jobs as jobs_router
from rewardserve.jobs.enabled import DISABLED
from rewardserve.schemas.jobs import JobCreate
from servers import free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PPO = {"type": "ppo", "config": {"total_steps": 3}, "prompts": ["hello"]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USER = [{"role": "user", "content": "hi"}]
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def app_for(manager: FakeJobManager | None):
    return build_app(Settings(), runtime=fake_runtime(manager))


@pytest.fixture
def manager() -> FakeJobManager:
    return FakeJobManager()


@pytest.fixture
async def client(manager: FakeJobManager) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_for(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        yield c


async def new_job(client: httpx.AsyncClient, **body: Any) -> dict:
    r = await client.post("/v1/jobs", json={**PPO, **body})
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, field: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field, error
    return error


def sse_events(text: str) -> list[dict[str, str]]:
    """The events of an SSE body (comments such as pings skipped)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if fields:
            out.append(fields)
    return out


# ---- create, get, list ---------------------------------------------------------------------


async def test_create_is_201_and_a_replay_is_200_with_the_same_job(client, manager) -> None:
    first = await client.post("/v1/jobs", json={**PPO, "idempotency_key": "k1"})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    job = first.json()
    assert job["id"].startswith("job-") and job["status"] == "queued"
    assert job["total_steps"] == 3 and job["config"]["total_steps"] == 3
    again = await client.post("/v1/jobs", json={**PPO, "idempotency_key": "k1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == job
    other = await client.post("/v1/jobs", json={**PPO, "prompts": ["x"], "idempotency_key": "k1"})
    assert_error(other, 409, "idempotency_key")
    assert len(manager.jobs) == 1


async def test_get_is_the_job_and_an_unknown_id_is_404(client) -> None:
    job = await new_job(client)
    r = await client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json() == job
    assert_error(await client.get("/v1/jobs/job-000000000000"), 404, "id")


async def test_list_filters_and_pages(client, manager) -> None:
    ids = [(await new_job(client))["id"] for _ in range(3)]
    manager.set_status(ids[0], "running")
    r = await client.get("/v1/jobs", params={"limit": 2})
    assert r.status_code == 200
    page = r.json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["next_page_token"]
    r = await client.get("/v1/jobs", params={"limit": 2, "page_token": page["next_page_token"]})
    assert [j["id"] for j in r.json()["data"]] == ids[:1] and r.json()["next_page_token"] is None
    # repeated and comma-separated statuses, deduplicated in order
    r = await client.get("/v1/jobs?status=running&status=queued,running&type=ppo")
    assert r.status_code == 200 and len(r.json()["data"]) == 3
    assert manager.list_calls[-1] == {
        "status": ["running", "queued"],
        "type": "ppo",
        "limit": 50,
        "page_token": None,
    }
    r = await client.get("/v1/jobs", params={"status": "running"})
    assert [j["id"] for j in r.json()["data"]] == ids[:1]
    assert (await client.get("/v1/jobs", params={"type": "reward"})).json()["data"] == []


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"status": "done"}, 400, "status"),
        ({"status": "queued,bogus"}, 400, "status"),
        ({"type": "sft"}, 422, "type"),
        ({"limit": 0}, 422, "limit"),
        ({"limit": 501}, 422, "limit"),
        ({"limit": "many"}, 422, "limit"),
        ({"page_token": "not-a-token"}, 400, "page_token"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
async def test_bad_list_filters_name_the_parameter(client, params, status, field) -> None:
    assert_error(await client.get("/v1/jobs", params=params), status, field)


# ---- malformed submissions -----------------------------------------------------------------

MALFORMED = [
    ("no type", {"prompts": ["p"]}, 422, "type"),
    ("bad type", {**PPO, "type": "sft"}, 422, "type"),
    ("type not a string", {**PPO, "type": 3}, 422, "type"),
    ("unknown field", {**PPO, "steps": 3}, 422, "steps"),
    ("config not an object", {**PPO, "config": [1, 2]}, 422, "config"),
    ("empty prompts", {**PPO, "prompts": []}, 422, "prompts"),
    ("prompt not text", {**PPO, "prompts": [7]}, 422, "prompts.0"),
    ("prompt with both forms", {**PPO, "prompts": [{"prompt": "p", "messages": USER}]}, 422,
     "prompts.0"),
    ("empty prompt", {**PPO, "prompts": ["ok", {"prompt": ""}]}, 422, "prompts.1.prompt"),
    ("bad role", {**PPO, "prompts": [{"messages": [{"role": "bot", "content": "c"}]}]}, 422,
     "prompts.0.messages.0.role"),
    ("empty prompts_file", {"type": "ppo", "prompts_file": ""}, 422, "prompts_file"),
    ("negative gpus", {**PPO, "resources": {"gpus": -1}}, 422, "resources.gpus"),
    ("zero cpus", {**PPO, "resources": {"cpus": 0}}, 422, "resources.cpus"),
    ("unknown resource", {**PPO, "resources": {"tpus": 1}}, 422, "resources.tpus"),
    ("empty idempotency key", {**PPO, "idempotency_key": ""}, 422, "idempotency_key"),
    ("long idempotency key", {**PPO, "idempotency_key": "k" * 201}, 422, "idempotency_key"),
    ("body not an object", [PPO], 422, "body"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "field"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])  # fmt: skip
async def test_malformed_submissions_name_the_field(client, manager, body, status, field) -> None:
    error = assert_error(await client.post("/v1/jobs", json=body), status, field)
    assert error["code"] == "invalid_argument"
    assert manager.jobs == {}


async def test_a_body_that_is_not_json_or_missing_is_400(client) -> None:
    r = await client.post(
        "/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "body")
    assert_error(await client.post("/v1/jobs"), 400, "body")


# ---- metrics, plot, logs -------------------------------------------------------------------


async def test_metrics_as_json_and_csv(client, manager) -> None:
    job_id = (await new_job(client))["id"]
    assert (await client.get(f"/v1/jobs/{job_id}/metrics")).json() == {"data": []}
    manager.step(job_id, 1, {"objective/kl": 0.5, "lr": 1e-5})
    manager.step(job_id, 2, {"objective/kl": 0.25, "kl_coef": 0.05, "eval": {"a": 1}, "x": None})
    r = await client.get(f"/v1/jobs/{job_id}/metrics")
    assert r.status_code == 200 and [m["step"] for m in r.json()["data"]] == [1, 2]
    r = await client.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["step", "objective/kl", "lr", "kl_coef", "eval", "x"]
    assert rows[1] == ["1", "0.5", "1e-05", "", "", ""]
    assert rows[2] == ["2", "0.25", "", "0.05", '{"a": 1}', ""]
    empty = await client.get(f"/v1/jobs/{job_id}-x/metrics", params={"format": "csv"})
    assert_error(empty, 404, "id")
    assert_error(await client.get(f"/v1/jobs/{job_id}/metrics?format=xml"), 422, "format")


def read_png(data: bytes):
    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


async def test_plot_is_a_png_before_and_after_steps(client, manager) -> None:
    job_id = (await new_job(client))["id"]
    r = await client.get(f"/v1/jobs/{job_id}/plot.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    empty = read_png(r.content)
    for step in range(1, 4):
        manager.step(
            job_id,
            step,
            {
                "objective/scores": step / 3,
                "objective/kl": 0.1 * step,
                "kl_coef": 0.05,
                "loss/policy_avg": -0.1,
                "loss/value_avg": 0.3,
                "objective/entropy": 2.0,
                "response_length": 12.0 + step,
            },
        )
    r = await client.get(f"/v1/jobs/{job_id}/plot.png")
    full = read_png(r.content)
    assert full.ndim == 3 and full.shape[0] * full.shape[1] > empty.shape[0] * empty.shape[1]
    assert_error(await client.get("/v1/jobs/job-nope/plot.png"), 404, "id")


async def test_logs_whole_and_tail(client, manager) -> None:
    job_id = (await new_job(client))["id"]
    manager.logs_of[job_id] = "attempt 1\nstep 1\nstep 2\n"
    r = await client.get(f"/v1/jobs/{job_id}/logs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == "attempt 1\nstep 1\nstep 2\n"
    assert (await client.get(f"/v1/jobs/{job_id}/logs?tail_bytes=7")).text == "step 2\n"
    assert_error(await client.get(f"/v1/jobs/{job_id}/logs?tail_bytes=0"), 422, "tail_bytes")
    assert_error(await client.get("/v1/jobs/job-nope/logs"), 404, "id")


# ---- cancel, resume, report ----------------------------------------------------------------


async def test_cancel_then_resume_and_their_conflicts(client) -> None:
    job_id = (await new_job(client))["id"]
    assert_error(await client.post(f"/v1/jobs/{job_id}/resume"), 409, "id")
    r = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert_error(await client.post(f"/v1/jobs/{job_id}/cancel"), 409, "id")
    r = await client.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert_error(await client.post("/v1/jobs/job-nope/cancel"), 404, "id")
    assert_error(await client.post("/v1/jobs/job-nope/resume"), 404, "id")


async def test_report_is_204_and_a_stale_attempt_409(client, manager) -> None:
    job_id = (await new_job(client))["id"]
    manager.set_status(job_id, "running", attempt=1)
    body = {"attempt": 1, "kind": "step", "step": 1, "metrics": {"loss": 0.5}}
    r = await client.post(f"/v1/jobs/{job_id}/report", json=body)
    assert r.status_code == 204 and r.content == b""
    assert manager.reports[-1][1].metrics == {"loss": 0.5}
    assert_error(await client.post(f"/v1/jobs/{job_id}/report", json={**body, "attempt": 2}),
                 409, "attempt")  # fmt: skip
    assert_error(await client.post(f"/v1/jobs/{job_id}/report", json={**body, "kind": "x"}),
                 422, "kind")  # fmt: skip
    assert_error(await client.post(f"/v1/jobs/{job_id}/report", json={**body, "attempt": 0}),
                 422, "attempt")  # fmt: skip
    assert_error(await client.post("/v1/jobs/job-nope/report", json=body), 404, "id")


# ---- events (SSE) --------------------------------------------------------------------------


async def finished_job(client, manager, steps: int = 3) -> str:
    job_id = (await new_job(client))["id"]
    manager.set_status(job_id, "running", attempt=1)
    for step in range(1, steps + 1):
        manager.step(job_id, step, {"objective/kl": 0.1})
    manager.emit(job_id, "checkpoint", {"step": steps, "path": "/x"})
    manager.set_status(job_id, "succeeded", result={"policy": "p"})
    return job_id


async def test_events_are_every_event_in_order_and_end_at_the_terminal_one(client, manager) -> None:
    job_id = await finished_job(client, manager)
    r = await client.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["event"] for e in events] == ["status", "status", "step", "step", "step",
                                            "checkpoint", "status"]  # fmt: skip
    stored = manager.events_of[job_id]
    assert [int(e["id"]) for e in events] == [e.id for e in stored]
    payloads = [json.loads(e["data"]) for e in events]
    assert [p["id"] for p in payloads] == [e.id for e in stored]
    assert all(p["job_id"] == job_id for p in payloads)
    assert [p["data"]["step"] for p in payloads if p["type"] == "step"] == [1, 2, 3]
    assert payloads[-1]["data"] == {"status": "succeeded"}
    assert payloads[2]["data"]["samples"][0]["reward"] == 0.5
    assert manager.open_streams == 0


async def test_events_resume_after_last_event_id_or_after(client, manager) -> None:
    job_id = await finished_job(client, manager)
    ids = [e.id for e in manager.events_of[job_id]]
    r = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[3])})
    assert [int(e["id"]) for e in sse_events(r.text)] == ids[4:]
    r = await client.get(f"/v1/jobs/{job_id}/events", params={"after": ids[5]})
    assert [int(e["id"]) for e in sse_events(r.text)] == ids[6:]
    # a reconnecting EventSource sends the header and keeps its URL: the header wins
    r = await client.get(
        f"/v1/jobs/{job_id}/events",
        params={"after": ids[0]},
        headers={"Last-Event-ID": str(ids[5])},
    )
    assert [int(e["id"]) for e in sse_events(r.text)] == ids[6:]
    # after the terminal event: an empty stream that ends
    r = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[-1])})
    assert r.status_code == 200 and sse_events(r.text) == []


async def test_events_see_live_events_until_the_job_ends(client, manager) -> None:
    job_id = (await new_job(client))["id"]

    async def run_job() -> None:
        await asyncio.sleep(0.05)
        manager.set_status(job_id, "running", attempt=1)
        for step in (1, 2):
            await asyncio.sleep(0.02)
            manager.step(job_id, step, {"objective/kl": 0.1})
        manager.set_status(job_id, "failed", error="boom")
        manager.emit(job_id, "log", {"message": "after the end: never streamed"})

    worker = asyncio.create_task(run_job())
    r = await asyncio.wait_for(client.get(f"/v1/jobs/{job_id}/events"), 10)
    await worker
    types = [(e["event"], json.loads(e["data"])["data"].get("status")) for e in sse_events(r.text)]
    assert types == [("status", "queued"), ("status", "running"), ("step", None),
                     ("step", None), ("status", "failed")]  # fmt: skip
    assert manager.open_streams == 0


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
async def test_a_bad_last_event_id_is_400(client, value) -> None:
    job_id = (await new_job(client))["id"]
    r = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": value})
    assert_error(r, 400, "last-event-id")
    assert_error(await client.get(f"/v1/jobs/{job_id}/events?after=-1"), 422, "after")


async def test_events_of_an_unknown_job_are_404_not_a_stream(client) -> None:
    assert_error(await client.get("/v1/jobs/job-nope/events"), 404, "id")


async def test_a_disconnect_closes_the_stream_and_pings_keep_it_open(manager, monkeypatch) -> None:
    """A real server (httpx's ASGI transport buffers whole bodies): read the first event and
    a ping, hang up, and the manager's iterator is closed."""
    monkeypatch.setattr(jobs_router, "PING_S", 0.2)
    port = free_port()
    config = uvicorn.Config(app_for(manager), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=ADMIN) as c:
            for _ in range(100):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            job_id = (await new_job(c))["id"]
            lines: list[str] = []
            async with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
                    if any(x.startswith(":") for x in lines) and "event: status" in lines:
                        break
            assert manager.open_streams in (0, 1)
            for _ in range(100):  # the server notices the hang-up
                if manager.open_streams == 0:
                    break
                await asyncio.sleep(0.05)
            assert manager.open_streams == 0
            assert any(x.startswith(": ping") for x in lines), lines
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


# ---- scope, disabled, schema ---------------------------------------------------------------

JOB = "job-000000000001"
ROUTES = [
    ("POST", "/v1/jobs", PPO),
    ("GET", "/v1/jobs", None),
    ("GET", f"/v1/jobs/{JOB}", None),
    ("GET", f"/v1/jobs/{JOB}/metrics", None),
    ("GET", f"/v1/jobs/{JOB}/events", None),
    ("GET", f"/v1/jobs/{JOB}/plot.png", None),
    ("GET", f"/v1/jobs/{JOB}/logs", None),
    ("POST", f"/v1/jobs/{JOB}/cancel", None),
    ("POST", f"/v1/jobs/{JOB}/resume", None),
    ("POST", f"/v1/jobs/{JOB}/report", {"attempt": 1, "kind": "log", "message": "m"}),
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ROUTES]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_every_job_route_needs_the_admin_scope(manager, method, path, body) -> None:
    transport = httpx.ASGITransport(app=app_for(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.request(method, path, json=body)
        assert_error(r, 401, "authorization")
        r = await c.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
        assert_error(r, 401, "authorization")
        r = await c.request(
            method, path, json=body, headers={"Authorization": f"Bearer {SCORE_KEY}"}
        )
        assert_error(r, 403, "authorization")
        r = await c.request(method, path, json=body, headers=ADMIN)
        # admin gets through to the manager: the job is unknown, or the call works
        assert r.status_code in (200, 201, 404), r.text


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_jobs_disabled_is_503_on_every_route(method, path, body) -> None:
    transport = httpx.ASGITransport(app=app_for(None))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        r = await c.request(method, path, json=body)
    error = assert_error(r, 503, None)
    assert error["code"] == "unavailable" and error["message"] == DISABLED
    assert "--jobs-enabled" in DISABLED


def test_the_schema_documents_each_job_route_and_its_content_types() -> None:
    paths = app_for(None).openapi()["paths"]
    for method, path, _ in ROUTES:
        templated = path.replace(JOB, "{job_id}")
        responses = paths[templated][method.lower()]["responses"]
        assert {"401", "403", "404" if "{" in templated else "401", "503"} <= set(responses)
        errors = [s for s in responses if s.startswith(("4", "5"))]
        assert all(list(responses[s]["content"]) == ["application/json"] for s in errors)
    assert "201" in paths["/v1/jobs"]["post"]["responses"]
    assert "200" in paths["/v1/jobs"]["post"]["responses"]
    assert "409" in paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "204" in paths["/v1/jobs/{job_id}/report"]["post"]["responses"]
    ok = {p: paths[p]["get"]["responses"]["200"]["content"] for p in paths if "{job_id}/" in p
          and "get" in paths[p]}  # fmt: skip
    assert set(ok["/v1/jobs/{job_id}/metrics"]) == {"application/json", "text/csv"}
    assert list(ok["/v1/jobs/{job_id}/events"]) == ["text/event-stream"]
    assert list(ok["/v1/jobs/{job_id}/plot.png"]) == ["image/png"]
    assert list(ok["/v1/jobs/{job_id}/logs"]) == ["text/plain"]


def test_success_answers_match_the_schema() -> None:
    """Schemathesis' conformance checks (status, content type, body) on each route's success
    answer; the fuzz test (tests/integration/test_fuzz.py) mostly meets their errors."""
    manager = FakeJobManager()
    job, _ = asyncio.run(manager.create(JobCreate(type="ppo", prompts=["p"])))
    ended, _ = asyncio.run(manager.create(JobCreate(type="reward")))
    manager.set_status(job.id, "running", attempt=1)
    for step in (1, 2):
        manager.step(job.id, step, {"objective/kl": 0.1, "kl_coef": 0.05})
    manager.set_status(ended.id, "cancelled", attempt=1)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app_for(manager))
    report = {"attempt": 1, "kind": "log", "message": "m"}
    cases = [
        ("/v1/jobs", "POST", {"body": PPO}),
        ("/v1/jobs", "GET", {"query": {"status": "running,queued", "limit": 1}}),
        ("/v1/jobs/{job_id}", "GET", {}),
        ("/v1/jobs/{job_id}/metrics", "GET", {}),
        ("/v1/jobs/{job_id}/metrics", "GET", {"query": {"format": "csv"}}),
        ("/v1/jobs/{job_id}/plot.png", "GET", {}),
        ("/v1/jobs/{job_id}/logs", "GET", {"query": {"tail_bytes": 10}}),
        ("/v1/jobs/{job_id}/report", "POST", {"body": report}),
        ("/v1/jobs/{job_id}/resume", "POST", {"job_id": ended.id}),
        ("/v1/jobs/{job_id}/cancel", "POST", {}),
        ("/v1/jobs/{job_id}/events", "GET", {}),  # after cancel: the stream ends
    ]
    for path, method, kwargs in cases:
        ids = {"job_id": kwargs.pop("job_id", job.id)} if "{" in path else None
        case = schema[path][method].Case(path_parameters=ids, headers=dict(ADMIN), **kwargs)
        response = case.call_and_validate(checks=CONFORMANCE)
        assert response.status_code < 300, (path, response.text)
