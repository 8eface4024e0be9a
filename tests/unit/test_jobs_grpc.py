"""gRPC JobService against a fake JobManager (tests/jobs_fake.py), on a real grpc.aio server
(GrpcServer, with its interceptors) on a free port: conversions both ways, WatchJob's order,
resume point, end and cancellation, admin scope, malformed requests, jobs disabled.

The manager here is a spec'd in-memory fake that the test drives (emits events, flips
statuses), so each transport's wire format is checked on its own; the real manager with real
workers is tested through both transports in tests/integration/test_jobs_api.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobs_fake import ADMIN_KEY, SCORE_KEY, FakeJobManager, fake_runtime
from rewardserve.config import Settings
from rewardserve.grpc.server import JOB_SERVICE_NAME, GrpcServer
from rewardserve.jobs.enabled import DISABLED
from rewardserve.schemas.jobs import Checkpoint
from rewardserve.v1 import bon_pb2, scoring_pb2
from rewardserve.v1 import jobs_pb2 as pb
from rewardserve.v1 import jobs_pb2_grpc as pb_grpc
from servers import free_port

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
G = grpc.StatusCode


def struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def create_req(**over) -> pb.CreateJobRequest:
    fields = {
        "type": "ppo",
        "config": struct({"total_steps": 3, "kl_coef": 0.1}),
        "prompts": [bon_pb2.PromptInput(prompt="hello")],
    }
    return pb.CreateJobRequest(**{**fields, **over})


@pytest.fixture(scope="module")
def manager() -> FakeJobManager:
    return FakeJobManager()


@pytest.fixture(scope="module")
async def served(manager: FakeJobManager) -> AsyncIterator[SimpleNamespace]:
    runtime = fake_runtime(manager)
    server = GrpcServer(Settings(host="127.0.0.1", grpc_port=free_port()), runtime)
    await server.start()
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield SimpleNamespace(
            runtime=runtime, channel=channel, stub=pb_grpc.JobServiceStub(channel)
        )
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture
def stub(served) -> pb_grpc.JobServiceStub:
    return served.stub


async def error_of(call: Awaitable) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    return err.code(), dict(err.trailing_metadata() or ()).get("error-field"), err.details()


async def create(stub, **over) -> pb.Job:
    return await stub.CreateJob(create_req(**over), metadata=ADMIN)


def as_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# ---- unary RPCs ----------------------------------------------------------------------------


async def test_create_get_and_the_job_message(stub, manager) -> None:
    job = await create(stub, resources=pb.Resources(gpus=0, memory_gib=2))
    assert job.id.startswith("job-") and job.type == "ppo" and job.status == "queued"
    assert job.total_steps == 3 and job.config["total_steps"] == 3
    assert datetime.fromisoformat(job.created_at).tzinfo is not None
    assert job.created_at.endswith("Z") and job.started_at == "" and job.ended_at == ""
    assert job.resources.HasField("memory_gib") and not job.resources.HasField("cpus")
    # Struct numbers are doubles: whole ones reach the manager as ints, as REST's JSON would
    body = manager.bodies[job.id]
    assert body.config == {"total_steps": 3, "kl_coef": 0.1}
    assert type(body.config["total_steps"]) is int
    assert body.prompts[0].prompt == "hello" and body.resources.memory_gib == 2
    assert body.prompts_file is None and body.idempotency_key is None
    assert await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=ADMIN) == job
    code, field, _ = await error_of(stub.GetJob(pb.GetJobRequest(id="job-nope"), metadata=ADMIN))
    assert (code, field) == (G.NOT_FOUND, "id")
    code, field, _ = await error_of(stub.GetJob(pb.GetJobRequest(), metadata=ADMIN))
    assert (code, field) == (G.INVALID_ARGUMENT, "id")


async def test_job_fields_convert_with_metrics_checkpoints_and_result(stub, manager) -> None:
    job = await create(stub)
    manager.step(job.id, 2, {"objective/kl": 0.5, "eval": {"a": [1, 2]}, "nan": None})
    manager.set_status(
        job.id,
        "succeeded",
        checkpoints=[Checkpoint(step=2, path="/c/2")],
        result={"policy": "ppo-x"},
        started_at=datetime.fromisoformat("2025-01-02T03:04:05+00:00"),
        attempt=1,
    )
    got = await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=ADMIN)
    d = as_dict(got)
    assert d["metrics"] == {"step": 2, "objective/kl": 0.5, "eval": {"a": [1, 2]}, "nan": None}
    assert d["checkpoints"] == [{"step": "2", "path": "/c/2"}]
    assert d["result"] == {"policy": "ppo-x"} and d["status"] == "succeeded"
    assert got.started_at == "2025-01-02T03:04:05Z" and got.attempt == 1


async def test_idempotent_create_answers_the_first_job(stub) -> None:
    first = await create(stub, idempotency_key="grpc-k")
    assert await create(stub, idempotency_key="grpc-k") == first
    code, field, _ = await error_of(create(stub, idempotency_key="grpc-k", prompts_file="p.jsonl"))
    assert (code, field) == (G.FAILED_PRECONDITION, "idempotency_key")


async def test_list_filters_and_pages(stub, manager) -> None:
    ids = [(await create(stub, type="reward")).id for _ in range(3)]
    page = await stub.ListJobs(pb.ListJobsRequest(type="reward", limit=2), metadata=ADMIN)
    assert [j.id for j in page.jobs] == ids[::-1][:2] and page.next_page_token
    last = await stub.ListJobs(
        pb.ListJobsRequest(type="reward", limit=2, page_token=page.next_page_token),
        metadata=ADMIN,
    )
    assert [j.id for j in last.jobs] == ids[:1] and last.next_page_token == ""
    await stub.ListJobs(pb.ListJobsRequest(status=["running", "queued,running"]), metadata=ADMIN)
    assert manager.list_calls[-1] == {
        "status": ["running", "queued"],
        "type": None,
        "limit": 50,
        "page_token": None,
    }


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListJobsRequest(status=["done"]), "status"),
        (pb.ListJobsRequest(status=["queued", ""]), None),  # empty entries are ignored
        (pb.ListJobsRequest(type="sft"), "type"),
        (pb.ListJobsRequest(limit=-1), "limit"),
        (pb.ListJobsRequest(limit=501), "limit"),
        (pb.ListJobsRequest(page_token="not-a-token"), "page_token"),
    ],
    ids=["bad status", "empty status entry", "bad type", "negative limit", "limit too big",
         "bad page token"],
)  # fmt: skip
async def test_bad_list_filters_name_the_field(stub, request_, field) -> None:
    if field is None:
        await stub.ListJobs(request_, metadata=ADMIN)
        return
    code, got, _ = await error_of(stub.ListJobs(request_, metadata=ADMIN))
    assert (code, got) == (G.INVALID_ARGUMENT, field)


async def test_cancel_then_resume_and_their_conflicts(stub) -> None:
    job = await create(stub)
    by_id = pb.GetJobRequest(id=job.id)
    code, field, _ = await error_of(stub.ResumeJob(by_id, metadata=ADMIN))
    assert (code, field) == (G.FAILED_PRECONDITION, "id")
    assert (await stub.CancelJob(by_id, metadata=ADMIN)).status == "cancelled"
    code, _, _ = await error_of(stub.CancelJob(by_id, metadata=ADMIN))
    assert code == G.FAILED_PRECONDITION
    assert (await stub.ResumeJob(by_id, metadata=ADMIN)).status == "queued"
    code, field, _ = await error_of(stub.CancelJob(pb.GetJobRequest(id="job-x"), metadata=ADMIN))
    assert (code, field) == (G.NOT_FOUND, "id")


# ---- malformed CreateJob -------------------------------------------------------------------

MALFORMED = [
    ("no type", {"type": ""}, "type"),
    ("bad type", {"type": "sft"}, "type"),
    ("empty prompt", {"prompts": [bon_pb2.PromptInput(prompt="")]}, "prompts.0.prompt"),
    ("prompt with no form", {"prompts": [bon_pb2.PromptInput()]}, "prompts.0"),
    ("bad role", {"prompts": [bon_pb2.PromptInput(messages=scoring_pb2.Conversation(
        messages=[scoring_pb2.ChatMessage(role="bot", content="c")]))]},
     "prompts.0.messages.0.role"),
    ("negative gpus", {"resources": pb.Resources(gpus=-1)}, "resources.gpus"),
    ("zero cpus", {"resources": pb.Resources(cpus=0)}, "resources.cpus"),
    ("too much memory", {"resources": pb.Resources(memory_gib=1e9)}, "resources.memory_gib"),
    ("long idempotency key", {"idempotency_key": "k" * 201}, "idempotency_key"),
]  # fmt: skip


@pytest.mark.parametrize(("over", "field"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])  # fmt: skip
async def test_malformed_create_is_invalid_argument_naming_the_field(stub, over, field) -> None:
    code, got, _ = await error_of(create(stub, **over))
    assert (code, got) == (G.INVALID_ARGUMENT, field)


async def test_an_undecodable_message_is_invalid_argument(served) -> None:
    for method in ("CreateJob", "GetJob", "ListJobs"):
        call = served.channel.unary_unary(f"/rewardserve.v1.JobService/{method}")
        code, field, _ = await error_of(call(b"\xff\xff\xff", metadata=ADMIN))
        assert (code, field) == (G.INVALID_ARGUMENT, "body"), method


async def test_a_negative_after_event_id_is_invalid_argument(stub) -> None:
    job = await create(stub)
    call = stub.WatchJob(pb.WatchJobRequest(id=job.id, after_event_id=-1), metadata=ADMIN)
    code, field, _ = await error_of(call.read())
    assert (code, field) == (G.INVALID_ARGUMENT, "after_event_id")


# ---- WatchJob ------------------------------------------------------------------------------


def run_to_the_end(manager: FakeJobManager, job_id: str, steps: int = 3) -> None:
    manager.set_status(job_id, "running", attempt=1)
    for step in range(1, steps + 1):
        manager.step(job_id, step, {"objective/kl": 0.1 * step})
    manager.emit(job_id, "checkpoint", {"step": steps, "path": "/x"})
    manager.set_status(job_id, "succeeded")


async def watch(stub, job_id: str, after: int = 0) -> list[pb.JobEvent]:
    call = stub.WatchJob(pb.WatchJobRequest(id=job_id, after_event_id=after), metadata=ADMIN)
    return [e async for e in call]


async def test_watch_sees_every_event_in_order_and_ends_at_the_terminal_one(stub, manager) -> None:
    job = await create(stub)
    run_to_the_end(manager, job.id)
    events = await asyncio.wait_for(watch(stub, job.id), 10)
    stored = manager.events_of[job.id]
    assert [e.id for e in events] == [e.id for e in stored]
    assert [e.type for e in events] == ["status", "status", "step", "step", "step",
                                        "checkpoint", "status"]  # fmt: skip
    steps = [as_dict(e.data) for e in events if e.type == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["samples"] == [{"prompt": "p", "response": "r", "reward": 0.5}]
    assert events[-1].data["status"] == "succeeded" and events[-1].job_id == job.id
    assert datetime.fromisoformat(events[0].created_at).tzinfo is not None
    # the same events REST streams, resumable after any id
    assert [e.id for e in await watch(stub, job.id, after=stored[3].id)] == [
        e.id for e in stored[4:]
    ]
    assert await watch(stub, job.id, after=stored[-1].id) == []
    assert manager.open_streams == 0


async def test_watch_streams_live_events(stub, manager) -> None:
    job = await create(stub)

    async def run_job() -> None:
        await asyncio.sleep(0.05)
        run_to_the_end(manager, job.id, steps=2)

    worker = asyncio.create_task(run_job())
    events = await asyncio.wait_for(watch(stub, job.id), 10)
    await worker
    assert [e.type for e in events] == ["status", "status", "step", "step", "checkpoint",
                                        "status"]  # fmt: skip


async def test_a_cancelled_watch_closes_the_managers_stream(stub, manager) -> None:
    job = await create(stub)
    call = stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=ADMIN)
    first = await call.read()
    assert first.type == "status" and manager.open_streams == 1
    call.cancel()
    for _ in range(100):
        if manager.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert manager.open_streams == 0


async def test_watch_of_an_unknown_job_is_not_found(stub) -> None:
    code, field, _ = await error_of(watch(stub, "job-nope"))
    assert (code, field) == (G.NOT_FOUND, "id")


# ---- scope, disabled, health ---------------------------------------------------------------

CALLS = [
    ("CreateJob", create_req()),
    ("GetJob", pb.GetJobRequest(id="job-000000000001")),
    ("ListJobs", pb.ListJobsRequest()),
    ("CancelJob", pb.GetJobRequest(id="job-000000000001")),
    ("ResumeJob", pb.GetJobRequest(id="job-000000000001")),
    ("WatchJob", pb.WatchJobRequest(id="job-000000000001")),
]


async def invoke(stub, name: str, request, metadata=()) -> None:
    result = getattr(stub, name)(request, metadata=metadata)
    if name == "WatchJob":
        async for _ in result:
            pass
    else:
        await result


@pytest.mark.parametrize(("name", "request_"), CALLS, ids=[c[0] for c in CALLS])
async def test_every_rpc_needs_the_admin_scope(stub, name, request_) -> None:
    code, field, _ = await error_of(invoke(stub, name, request_))
    assert (code, field) == (G.UNAUTHENTICATED, "authorization")
    score = (("authorization", f"Bearer {SCORE_KEY}"),)
    code, field, _ = await error_of(invoke(stub, name, request_, score))
    assert (code, field) == (G.PERMISSION_DENIED, "authorization")
    try:  # admin reaches the manager: the call works or the job is unknown
        await invoke(stub, name, request_, ADMIN)
    except grpc.aio.AioRpcError as e:
        assert e.code() == G.NOT_FOUND, e


@pytest.mark.parametrize(("name", "request_"), CALLS, ids=[c[0] for c in CALLS])
async def test_jobs_disabled_is_unavailable(served, name, request_, monkeypatch) -> None:
    monkeypatch.setattr(served.runtime, "jobs", None)
    code, _, details = await error_of(invoke(served.stub, name, request_, ADMIN))
    assert (code, details) == (G.UNAVAILABLE, DISABLED)


async def test_health_and_reflection_know_the_job_service(served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=JOB_SERVICE_NAME))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    names = [
        s.name
        async for r in reflect.ServerReflectionInfo(iter([ask]))
        for s in r.list_services_response.service
    ]
    assert JOB_SERVICE_NAME == "rewardserve.v1.JobService" and JOB_SERVICE_NAME in names
