"""The jobs API on the real service (tests/servers.RewardServer) with real workers training
tiny models (tests/ppo_models): submission, listing, watching (SSE and gRPC WatchJob),
metrics, plots, logs, cancel and resume, idempotency, the admin scope and a corpus of
refused requests, on both transports.

One server (small job limits) serves most of the module; a second with API keys serves the
scope tests. Jobs are tiny (2-3 steps of 2x2 sequences of 8 tokens) and several run at once,
so the module stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.v1 import jobs_pb2 as pb
from rewardserve.v1 import jobs_pb2_grpc
from servers import RewardServer

MAX_STEPS, MAX_SEQUENCES = 50, 8
SCORE_KEY, ADMIN_KEY = "s1", "a1"
TINY = {"total_steps": 3, "batch_size": 2, "samples_per_prompt": 2, "mini_batch_size": 4,
        "max_new_tokens": 8, "rollout_backend": "transformers", "checkpoint_every": 1,
        "eval_max_prompts": 1, "seed": 3}  # fmt: skip
PPO = {"type": "ppo", "config": TINY, "prompts": PROMPTS[:4]}
PAIRS = [
    {
        "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
        "rejected": f"\n\nHuman: {q}\n\nAssistant: no",
    }
    for q, good in [
        ("Hi?", "Hello, how can I help?"),
        ("Name a river.", "The Nile."),
        ("Is water wet?", "Yes, it is."),
        ("Count to three.", "One, two, three."),
        ("Say thanks.", "Thank you!"),
    ]
]
REWARD = {"type": "reward", "config": {"base_model": "tiny-rm", "pairs": PAIRS, "epochs": 1,
          "batch_size": 2, "max_length": 32, "eval_fraction": 0.2, "torch_threads": 1}}  # fmt: skip
TERMINAL = {"succeeded", "failed", "cancelled"}
JOB_TIMEOUT_S = 150.0
PNG = b"\x89PNG\r\n\x1a\n"


# ---- servers and clients ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RewardServer]]:
    """'open': no keys, small job limits; 'auth': a score-only and an admin key. Both start
    together (imports overlap) and each trains into its own copy of the repository."""
    root = tmp_path_factory.mktemp("jobs-api")
    build_ppo_repository(root / "open")
    shutil.copytree(root / "open", root / "auth")
    common = ["--policy-backend", "transformers", "--job-stop-grace-s", "3"]
    limits = ["--job-max-total-steps", str(MAX_STEPS), "--max-running-jobs", "3",
              "--job-max-sequences-per-step", str(MAX_SEQUENCES)]  # fmt: skip
    # startup_timeout_s: 2 cores shared with other suites make a cold start take minutes
    started = {
        "open": RewardServer(root / "open", extra_args=[*common, *limits], startup_timeout_s=300),
        "auth": RewardServer(
            root / "auth",
            extra_args=common,
            api_keys=[f"{SCORE_KEY}:score", f"{ADMIN_KEY}:admin"],
            startup_timeout_s=300,
        ),
    }
    try:
        for s in started.values():
            s.launch()
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.cleanup()


@pytest.fixture(scope="module")
def server(servers: dict[str, RewardServer]) -> RewardServer:
    return servers["open"]


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[jobs_pb2_grpc.JobServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)


# ---- helpers ---------------------------------------------------------------------------------


def pb_create(body: dict[str, Any]) -> pb.CreateJobRequest:
    """A REST job body as a CreateJobRequest (a text prompt is PromptInput.prompt)."""
    data = dict(body)
    prompts = []
    for p in data.pop("prompts", None) or []:
        if isinstance(p, str):
            prompts.append({"prompt": p})
        elif "messages" in p:
            prompts.append({"messages": {"messages": p["messages"]}})
        else:
            prompts.append(p)
    if prompts or "prompts" in body:
        data["prompts"] = prompts
    return json_format.ParseDict(data, pb.CreateJobRequest())


def as_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def grpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def grpc_field(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("error-field")


def assert_rest_error(r: httpx.Response, status: int, field: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "field"}
    assert err["field"] == field, err


def wait_job(http: httpx.Client, job_id: str, until: Callable[[dict], bool]) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert job["status"] not in TERMINAL, job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.3)


def wait_terminal(http: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} never ended: {job}"
        time.sleep(0.3)


def sse(
    http: httpx.Client,
    job_id: str,
    *,
    last_event_id: int | None = None,
    stop: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """The job's server-sent events, parsed from the raw text/event-stream, until the server
    ends the stream (or `stop` says so). Each SSE id/event matches the JobEvent it carries."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[dict] = []
    timeout = httpx.Timeout(30, read=JOB_TIMEOUT_S)
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line.startswith(":"):  # keep-alive comment
                continue
            if line:
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[key] = fields[key] + "\n" + value if key in fields else value
                continue
            if "data" in fields:
                event = json.loads(fields["data"])
                assert fields["id"] == str(event["id"]) and fields["event"] == event["type"]
                assert event["job_id"] == job_id
                events.append(event)
                if stop is not None and stop(event):
                    break
            fields = {}
    return events


def grpc_watch(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, after: int = 0) -> list[dict]:
    stream = stub.WatchJob(
        pb.WatchJobRequest(id=job_id, after_event_id=after), timeout=JOB_TIMEOUT_S
    )
    return [as_dict(e) for e in stream]


def assert_full_run(events: list[dict], total: int, end: str = "succeeded") -> None:
    """Every step 1..total in order, a status event per change, the terminal one last."""
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    steps = [int(e["data"]["step"]) for e in events if e["type"] == "step"]
    assert steps == list(range(1, total + 1))
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", end]
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == end
    checkpoints = [int(e["data"]["step"]) for e in events if e["type"] == "checkpoint"]
    assert checkpoints and set(checkpoints) <= set(steps)


def job_count(http: httpx.Client) -> int:
    return len(http.get("/v1/jobs", params={"limit": 200}).json()["data"])


def worker_pids(job_id: str) -> list[int]:
    """Live worker processes of the job on this machine (the local runner's children)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"rewardserve.jobs.worker" in argv and job_id.encode() in argv and state != "Z":
            pids.append(int(proc.name))
    return pids


# ---- the jobs that train to success (started once, at the module's start) --------------------


@pytest.fixture(scope="module")
def auth_job(servers: dict[str, RewardServer]) -> str:
    """A 2-step PPO job submitted with the admin key: it trains while `trained`'s jobs do."""
    with servers["auth"].http() as http:
        r = http.post("/v1/jobs", json=PPO | {"config": {**TINY, "total_steps": 2}}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def trained(
    http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub, auth_job: str
) -> dict[str, Any]:
    """A PPO job made over REST and watched over SSE, one made over gRPC and watched with
    WatchJob (2 steps), and a reward job: all three run at once (and `auth_job` beside them
    on the other server), each watched live from its first event to its end."""
    t0 = time.monotonic()
    created = http.post("/v1/jobs", json=PPO)
    assert created.status_code == 201, created.text
    grpc_body = {**PPO, "config": {**TINY, "total_steps": 2}}
    grpc_job = as_dict(stub.CreateJob(pb_create(grpc_body), timeout=30))
    reward = http.post("/v1/jobs", json=REWARD)
    assert reward.status_code == 201, reward.text

    watched: dict[str, list[dict]] = {}

    def watch_grpc() -> None:
        watched["grpc"] = grpc_watch(stub, grpc_job["id"])

    thread = threading.Thread(target=watch_grpc)
    thread.start()
    rest_events = sse(http, created.json()["id"])
    thread.join(JOB_TIMEOUT_S)
    reward_job = wait_terminal(http, reward.json()["id"])
    return {
        "rest": created.json(),
        "rest_events": rest_events,
        "grpc": grpc_job,
        "grpc_events": watched.get("grpc"),
        "reward": reward_job,
        "seconds": time.monotonic() - t0,
    }


def test_create_answers_the_job_with_defaults_filled(trained: dict, server: RewardServer) -> None:
    job = trained["rest"]
    assert job["id"].startswith("job-") and len(job["id"]) == 16
    assert job["type"] == "ppo" and job["status"] == "queued"
    assert job["created_at"] and job["step"] == 0 and job["total_steps"] == 3
    config = job["config"]
    assert config["checkpoint_every"] == 1 and config["total_steps"] == 3
    assert config["policy"] == "tiny-chat" and config["reward_model"] == "tiny-rm"
    assert config["export_name"] == f"tiny-chat-ppo-{job['id']}"
    data_dir = Path(server.args[server.args.index("--data-dir") + 1]).resolve()
    assert Path(config["output_dir"]).resolve() == data_dir / "jobs" / job["id"] / "output"
    # PPOConfig's defaults, filled in
    assert config["learning_rate"] == 1e-5 and config["kl_coef"] == 0.05
    assert config["keep_checkpoints"] == 2 and config["advantage_estimator"] == "gae"


def test_grpc_create_and_get_match_rest(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    g = trained["grpc"]
    assert g["type"] == "ppo" and g["status"] == "queued" and int(g["total_steps"]) == 2
    assert g["config"]["export_name"] == f"tiny-chat-ppo-{g['id']}"
    for job_id in (trained["rest"]["id"], g["id"]):
        rest = http.get(f"/v1/jobs/{job_id}").json()
        got = as_dict(stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10))
        assert got["id"] == rest["id"] and got["status"] == rest["status"] == "succeeded"
        assert int(got["step"]) == rest["step"] == rest["total_steps"]
        assert got["result"] == rest["result"] and got["config"] == rest["config"]
        assert [c["path"] for c in got["checkpoints"]] == [c["path"] for c in rest["checkpoints"]]


def test_sse_and_watch_see_every_step_and_end(trained: dict) -> None:
    assert_full_run(trained["rest_events"], 3)
    assert trained["grpc_events"] is not None, "WatchJob never ended"
    assert_full_run(trained["grpc_events"], 2)


def test_sse_and_watch_replay_agree(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    job_id = trained["rest"]["id"]
    replay = sse(http, job_id)
    assert replay == trained["rest_events"]  # stored events are the live ones
    over_grpc = grpc_watch(stub, job_id)
    assert [int(e["id"]) for e in over_grpc] == [e["id"] for e in replay]
    assert [e["type"] for e in over_grpc] == [e["type"] for e in replay]


def test_sse_reconnect_resumes_after_last_event_id(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    job_id = trained["rest"]["id"]
    full = trained["rest_events"]
    for cut in (0, 1, len(full) // 2, len(full) - 1):
        seen = full[:cut]
        resumed = sse(http, job_id, last_event_id=seen[-1]["id"] if seen else None)
        assert seen + resumed == full
    after = [e["id"] for e in sse(http, job_id, last_event_id=full[2]["id"])]
    grpc_after = [int(e["id"]) for e in grpc_watch(stub, job_id, after=full[2]["id"])]
    assert after == grpc_after == [e["id"] for e in full[3:]]


def test_metrics_json_and_csv(trained: dict, http: httpx.Client) -> None:
    job_id = trained["rest"]["id"]
    rows = http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    r = http.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(r.text)))
    assert table[0][0] == "step" and len(table) == 1 + 3
    assert [int(row[0]) for row in table[1:]] == [1, 2, 3]
    assert set(table[0]) >= {k for k, v in rows[0].items() if not isinstance(v, dict | list)}


def test_plot_is_a_png_and_logs_hold_the_workers_lines(trained: dict, http: httpx.Client) -> None:
    job_id = trained["rest"]["id"]
    r = http.get(f"/v1/jobs/{job_id}/plot.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(PNG) and len(r.content) > 1000
    logs = http.get(f"/v1/jobs/{job_id}/logs").text
    assert f"==== attempt 1 of {job_id}" in logs
    assert f"job {job_id} attempt 1" in logs and f"job {job_id} succeeded" in logs
    tail = http.get(f"/v1/jobs/{job_id}/logs", params={"tail_bytes": 40}).text
    assert 0 < len(tail.encode()) <= 40 and logs.endswith(tail)


def test_trained_policy_serves_best_of_n_at_once(trained: dict, http: httpx.Client) -> None:
    for job_id in (trained["rest"]["id"], trained["grpc"]["id"]):
        job = http.get(f"/v1/jobs/{job_id}").json()
        policy = job["result"]["policy"]
        assert policy == job["config"]["export_name"]
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed[policy]["kind"] == "policy" and listed[policy]["status"] == "loaded"
        r = http.post(
            "/v1/best-of-n", json={"policy": policy, "prompt": "Hi", "n": 2, "max_tokens": 4}
        )
        assert r.status_code == 200, r.text
        assert r.json()["policy"] == policy


def test_trained_reward_model_scores_at_once(trained: dict, http: httpx.Client) -> None:
    job = trained["reward"]
    assert job["status"] == "succeeded", job
    model = job["result"]["model"]
    assert model == f"rm-{job['id']}" == job["config"]["name"]
    assert job["step"] == job["total_steps"] == 2
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed[model]["kind"] == "reward" and listed[model]["status"] == "loaded"
    r = http.post("/v1/score", json={"model": model, "items": [{"text": "Hello there"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model and len(r.json()["results"]) == 1


def test_list_filters_and_pages(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    everything = http.get("/v1/jobs", params={"limit": 200}).json()
    ids = [j["id"] for j in everything["data"]]
    ours = {trained["rest"]["id"], trained["grpc"]["id"], trained["reward"]["id"]}
    assert ours <= set(ids) and everything["next_page_token"] is None
    created = [j["created_at"] for j in everything["data"]]
    assert created == sorted(created, reverse=True)  # newest first

    walked, token, pages = [], None, 0
    while True:
        params = {"limit": 1} | ({"page_token": token} if token else {})
        page = http.get("/v1/jobs", params=params).json()
        walked += [j["id"] for j in page["data"]]
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert walked == ids and pages == len(ids)

    g_walked, g_token = [], ""
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(limit=1, page_token=g_token), timeout=10)
        g_walked += [j.id for j in page.jobs]
        g_token = page.next_page_token
        if not g_token:
            break
    assert g_walked == ids

    reward_only = http.get("/v1/jobs", params={"type": "reward"}).json()["data"]
    assert trained["reward"]["id"] in {j["id"] for j in reward_only}
    assert {j["type"] for j in reward_only} == {"reward"}
    g_reward = stub.ListJobs(pb.ListJobsRequest(type="reward"), timeout=10).jobs
    assert [j.id for j in g_reward] == [j["id"] for j in reward_only]

    succeeded = http.get("/v1/jobs", params={"status": "succeeded", "type": "ppo"}).json()["data"]
    assert {trained["rest"]["id"], trained["grpc"]["id"]} <= {j["id"] for j in succeeded}
    assert {(j["status"], j["type"]) for j in succeeded} == {("succeeded", "ppo")}
    both = http.get("/v1/jobs", params=[("status", "cancelled"), ("status", "succeeded")])
    assert {j["status"] for j in both.json()["data"]} <= {"cancelled", "succeeded"}
    g_both = stub.ListJobs(pb.ListJobsRequest(status=["cancelled", "succeeded"]), timeout=10)
    assert [j.id for j in g_both.jobs] == [j["id"] for j in both.json()["data"]]
    assert (
        http.get("/v1/jobs", params={"status": "running,queued", "type": "reward"}).json()["data"]
        == []
    )


# ---- cancel and resume -----------------------------------------------------------------------


def test_cancel_stops_the_worker_keeps_checkpoints_and_resume_continues(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    body = {**PPO, "config": {**TINY, "total_steps": 40}}
    job_id = http.post("/v1/jobs", json=body).json()["id"]
    # watch until the first checkpoint is written, then cancel
    seen = sse(http, job_id, stop=lambda e: e["type"] == "checkpoint")
    assert worker_pids(job_id), "no worker process for a running job"
    t0 = time.monotonic()
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert time.monotonic() - t0 < 10
    assert worker_pids(job_id) == []
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["ended_at"]
    assert job["checkpoints"], job
    output = Path(job["config"]["output_dir"])
    newest = max(job["checkpoints"], key=lambda c: c["step"])
    kept = Path(newest["path"])  # the trainer keeps the newest keep_checkpoints (2) folders
    assert kept.is_dir() and kept.is_relative_to(output) and any(kept.iterdir())
    newest = newest["step"]

    time.sleep(1.5)  # a stopped worker reports nothing more
    events = sse(http, job_id)  # ends: the job is terminal
    assert events[: len(seen)] == seen
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "cancelled"
    last_id = events[-1]["id"]
    assert http.get(f"/v1/jobs/{job_id}").json()["step"] == job["step"]

    # terminal: cancel again is refused on both transports
    assert_rest_error(http.post(f"/v1/jobs/{job_id}/cancel"), 409, "id")
    err = grpc_error(lambda: stub.CancelJob(pb.GetJobRequest(id=job_id), timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and grpc_field(err) == "id"

    resumed = as_dict(stub.ResumeJob(pb.GetJobRequest(id=job_id), timeout=10))
    assert resumed["status"] in ("queued", "running")
    after = sse(http, job_id, last_event_id=last_id, stop=lambda e: e["type"] == "step")
    assert after[0]["type"] == "status" and after[0]["data"]["status"] == "queued"
    assert after[0]["data"].get("reason") == "resumed"
    assert {"status": "running"}.items() <= after[1]["data"].items()
    # from the newest checkpoint on disk: the one reported, or one written just before the stop
    first_step = after[-1]
    assert first_step["type"] == "step"
    assert newest < first_step["data"]["step"] <= job["step"] + 1
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert (
        job["attempt"] == 2
        and f"==== attempt 2 of {job_id}" in http.get(f"/v1/jobs/{job_id}/logs").text
    )
    assert "resum" in http.get(f"/v1/jobs/{job_id}/logs").text.lower()

    again = as_dict(stub.CancelJob(pb.GetJobRequest(id=job_id), timeout=30))
    assert again["status"] == "cancelled" and worker_pids(job_id) == []
    steps = [r["step"] for r in http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert steps == list(range(1, len(steps) + 1))  # no gap across the resume, no repeats

    # a succeeded job neither cancels nor resumes
    done = trained["rest"]["id"]
    assert_rest_error(http.post(f"/v1/jobs/{done}/cancel"), 409, "id")
    assert_rest_error(http.post(f"/v1/jobs/{done}/resume"), 409, "id")
    err = grpc_error(lambda: stub.ResumeJob(pb.GetJobRequest(id=done), timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and grpc_field(err) == "id"


# ---- idempotency -----------------------------------------------------------------------------


def test_idempotency_key_replays_the_first_job(
    trained: dict, http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    # PromptInput objects: what a gRPC PromptInput.prompt means, so both transports send one body
    config = {k: v for k, v in TINY.items() if k != "checkpoint_every"} | {"total_steps": 2}
    prompts = [{"prompt": p} for p in PROMPTS[2:6]]
    body = {**PPO, "config": config, "prompts": prompts, "idempotency_key": "nightly-42"}
    first = http.post("/v1/jobs", json=body)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    job_id = first.json()["id"]
    assert first.json()["config"]["checkpoint_every"] == 10  # --job-checkpoint-every's default
    try:
        again = http.post("/v1/jobs", json=body)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == job_id
        reordered = {k: body[k] for k in reversed(list(body))}
        assert http.post("/v1/jobs", json=reordered).json()["id"] == job_id
        assert stub.CreateJob(pb_create(body), timeout=30).id == job_id

        other = {**body, "config": {**TINY, "total_steps": 3}}
        assert_rest_error(http.post("/v1/jobs", json=other), 409, "idempotency_key")
        err = grpc_error(lambda: stub.CreateJob(pb_create(other), timeout=30))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert grpc_field(err) == "idempotency_key"

        keyed = [j for j in http.get("/v1/jobs", params={"limit": 200}).json()["data"]
                 if j["idempotency_key"] == "nightly-42"]  # fmt: skip
        assert [j["id"] for j in keyed] == [job_id]
    finally:
        http.post(f"/v1/jobs/{job_id}/cancel")  # its training is not what this test is about


# ---- refused requests ------------------------------------------------------------------------


def ppo(**over: Any) -> dict[str, Any]:
    """The tiny PPO body with top-level fields replaced (None removes one)."""
    body = {**PPO, **over}
    return {k: v for k, v in body.items() if v is not None}


def cfg(**over: Any) -> dict[str, Any]:
    return ppo(config={**TINY, **over})


# (id, body, status, field); every one must be refused before anything starts
CREATE_CASES = [
    ("unknown type", ppo(type="dpo"), 422, "type"),
    ("unknown config field", cfg(temperature_typo=1.0), 422, "config.temperature_typo"),
    ("too many steps", cfg(total_steps=MAX_STEPS + 1), 422, "config.total_steps"),
    (
        "batch too big",
        cfg(batch_size=4, samples_per_prompt=4, mini_batch_size=16),
        422,
        "config.batch_size",
    ),
    ("unknown policy", cfg(policy="no-such-policy"), 422, "config.policy"),
    ("unknown reward model", cfg(reward_model="no-such-rm"), 422, "config.reward_model"),
    ("empty prompts", ppo(prompts=[]), 422, "prompts"),
    ("empty prompt", ppo(prompts=["fine", ""]), 422, "prompts.1"),
    ("prompts and file", ppo(prompts_file="prompts.jsonl"), 422, "prompts"),
    ("file outside ..", ppo(prompts=None, prompts_file="../x.jsonl"), 400, "prompts_file"),
    ("file outside /etc", ppo(prompts=None, prompts_file="/etc/passwd"), 400, "prompts_file"),
    ("missing file", ppo(prompts=None, prompts_file="nope.jsonl"), 422, "prompts_file"),
    ("output_dir", cfg(output_dir="/tmp/mine"), 422, "config.output_dir"),
    ("gpus", ppo(resources={"gpus": 1}), 400, "resources.gpus"),
    ("cpus", ppo(resources={"cpus": 1000}), 400, "resources.cpus"),
    ("reward job with prompts", {**REWARD, "prompts": ["x"]}, 422, "prompts"),
    (
        "reward unknown base model",
        {**REWARD, "config": {**REWARD["config"], "base_model": "nope"}},
        422,
        "config.base_model",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "field"), [c[1:] for c in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
def test_refused_submissions(
    http: httpx.Client,
    stub: jobs_pb2_grpc.JobServiceStub,
    body: dict,
    status: int,
    field: str,
) -> None:
    before = job_count(http)
    assert_rest_error(http.post("/v1/jobs", json=body), status, field)
    err = grpc_error(lambda: stub.CreateJob(pb_create(body), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    # a text prompt over gRPC is PromptInput.prompt: its error names that
    assert grpc_field(err) == (f"{field}.prompt" if field == "prompts.1" else field)
    assert job_count(http) == before


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"limit": 0}, 422, "limit"),
        ({"limit": 1000}, 422, "limit"),
        ({"status": "done"}, 400, "status"),
        ({"status": "running,nope"}, 400, "status"),
        ({"type": "dpo"}, 422, "type"),
        ({"page_token": "not-a-token"}, 400, "page_token"),
    ],
)
def test_refused_list_queries(http: httpx.Client, params: dict, status: int, field: str) -> None:
    assert_rest_error(http.get("/v1/jobs", params=params), status, field)


def test_limit_at_the_documented_maximum_is_served(
    http: httpx.Client, stub: jobs_pb2_grpc.JobServiceStub
) -> None:
    assert http.get("/v1/jobs", params={"limit": 500}).status_code == 200
    stub.ListJobs(pb.ListJobsRequest(limit=500), timeout=10)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListJobsRequest(limit=1000), "limit"),
        (pb.ListJobsRequest(limit=-1), "limit"),
        (pb.ListJobsRequest(status=["done"]), "status"),
        (pb.ListJobsRequest(type="dpo"), "type"),
        (pb.ListJobsRequest(page_token="not-a-token"), "page_token"),
    ],
)
def test_grpc_refused_list_queries(stub, request_, field) -> None:
    err = grpc_error(lambda: stub.ListJobs(request_, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and grpc_field(err) == field


UNKNOWN = "job-000000000000"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", ""), ("GET", "/metrics"), ("GET", "/metrics?format=csv"), ("GET", "/events"),
     ("GET", "/plot.png"), ("GET", "/logs"), ("POST", "/cancel"), ("POST", "/resume")],
)  # fmt: skip
def test_unknown_job_is_404(http: httpx.Client, method: str, path: str) -> None:
    assert_rest_error(http.request(method, f"/v1/jobs/{UNKNOWN}{path}"), 404, "id")


@pytest.mark.parametrize("rpc", ["GetJob", "CancelJob", "ResumeJob", "WatchJob"])
def test_grpc_unknown_job_is_not_found(stub, rpc: str) -> None:
    request = (pb.WatchJobRequest if rpc == "WatchJob" else pb.GetJobRequest)(id=UNKNOWN)

    def call() -> Any:
        result = getattr(stub, rpc)(request, timeout=10)
        return list(result) if rpc == "WatchJob" else result

    err = grpc_error(call)
    assert err.code() == grpc.StatusCode.NOT_FOUND and grpc_field(err) == "id"


def test_bad_last_event_id_is_refused(trained: dict, http: httpx.Client) -> None:
    job_id = trained["rest"]["id"]
    r = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "soon"})
    assert_rest_error(r, 400, "last-event-id")


# ---- the admin scope -------------------------------------------------------------------------

SCORE = {"Authorization": f"Bearer {SCORE_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REST_ROUTES = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{id}"),
               ("GET", "/v1/jobs/{id}/metrics"), ("GET", "/v1/jobs/{id}/events"),
               ("GET", "/v1/jobs/{id}/plot.png"), ("GET", "/v1/jobs/{id}/logs"),
               ("POST", "/v1/jobs/{id}/cancel"), ("POST", "/v1/jobs/{id}/resume"),
               ("POST", "/v1/jobs/{id}/report")]  # fmt: skip


def test_jobs_need_the_admin_scope(servers: dict[str, RewardServer], auth_job: str) -> None:
    """Refused calls change nothing; the job the admin key started (its worker authenticates
    with the key the service granted it) runs to success."""
    auth = servers["auth"]
    job_id = auth_job
    with auth.http() as http, grpc.insecure_channel(auth.grpc_target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        for method, path in REST_ROUTES:
            url = path.format(id=job_id)
            body = PPO if path == "/v1/jobs" else {"attempt": 1, "kind": "log", "message": "x"}
            kwargs = {"json": body} if method == "POST" else {}
            assert_rest_error(http.request(method, url, **kwargs), 401, "authorization")
            assert_rest_error(http.request(method, url, headers=SCORE, **kwargs), 403,
                              "authorization")  # fmt: skip

        calls = {
            "CreateJob": lambda md: stub.CreateJob(pb_create(PPO), metadata=md, timeout=10),
            "GetJob": lambda md: stub.GetJob(pb.GetJobRequest(id=job_id), metadata=md, timeout=10),
            "ListJobs": lambda md: stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=10),
            "CancelJob": lambda md: stub.CancelJob(pb.GetJobRequest(id=job_id), metadata=md,
                                                   timeout=10),
            "ResumeJob": lambda md: stub.ResumeJob(pb.GetJobRequest(id=job_id), metadata=md,
                                                   timeout=10),
            "WatchJob": lambda md: list(stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=md,
                                                      timeout=10)),
        }  # fmt: skip
        for name, call in calls.items():
            for md, code in [(None, grpc.StatusCode.UNAUTHENTICATED),
                             ((("authorization", f"Bearer {SCORE_KEY}"),),
                              grpc.StatusCode.PERMISSION_DENIED)]:  # fmt: skip
                err = grpc_error(lambda call=call, md=md: call(md))
                assert err.code() == code, (name, err.details())
                assert grpc_field(err) == "authorization"

        admin_md = (("authorization", f"Bearer {ADMIN_KEY}"),)
        watch = stub.WatchJob(
            pb.WatchJobRequest(id=job_id), metadata=admin_md, timeout=JOB_TIMEOUT_S
        )
        events = [as_dict(e) for e in watch]
        assert_full_run(events, 2)
        job = as_dict(stub.GetJob(pb.GetJobRequest(id=job_id), metadata=admin_md, timeout=10))
        assert job["status"] == "succeeded", job
        listed = stub.ListJobs(pb.ListJobsRequest(), metadata=admin_md, timeout=10)
        assert [j.id for j in listed.jobs] == [job_id]  # refused creates made nothing
        assert http.get(f"/v1/jobs/{job_id}/logs", headers=ADMIN).status_code == 200
        # its policy serves, to a score-scoped caller as any other policy
        r = http.post("/v1/best-of-n", headers=SCORE,
                      json={"policy": job["result"]["policy"], "prompt": "Hi", "n": 2,
                            "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200, r.text
