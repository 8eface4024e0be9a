"""The trainer's remote reward sources against a real server: ServiceReward (gRPC Score)
scores what the in-process scoring path scores for the same rollouts; OpenRLHFReward posts
OpenRLHF's /get_reward payload and retries 429/503 as a real HTTP server sends them."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import pytest_asyncio

from rewardserve.bon.service import reward_item
from rewardserve.client import InvalidArgument, NotFound, ResourceExhausted, RetryPolicy
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.schemas.bon import PromptInput
from rewardserve.training.ppo.remote_rewards import OpenRLHFReward, ServiceReward, hh_text
from servers import RewardServer

MESSAGES = [
    PromptInput(messages=[{"role": "user", "content": "How do I bake bread?"}]),
    PromptInput(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me a joke"},
        ]
    ),
]
PLAIN = [
    PromptInput(prompt="\n\nHuman: How do I bake bread?\n\nAssistant:"),
    PromptInput(prompt="Write a haiku about rain."),
]
RESPONSES = ["Mix flour, water and yeast, then bake it.", "Why did the chicken cross the road?"]
# Float noise only: the service and this process may batch (pad) the same texts differently.
REL = 1e-5


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(plain_server: RewardServer, tmp_path_factory) -> AsyncIterator[ScoringEngine]:
    """The in-process scoring path over the plain server's own repository."""
    settings = Settings(
        model_repository=plain_server.model_repository,
        cache_dir=tmp_path_factory.mktemp("inproc-cache"),
        models=["rm-a", "rm-b"],
        torch_threads=1,
    )
    eng = ScoringEngine(settings)
    await eng.start()
    yield eng
    await eng.close()


async def in_process(
    eng: ScoringEngine, model: str | None, prompts: list[PromptInput], responses: list[str]
) -> list[float]:
    """What InProcessReward computes: reward_item rendered by the engine, no queue limit."""
    loaded = eng.resolve(model)
    texts = [eng.render(loaded, reward_item(p, r)) for p, r in zip(prompts, responses, strict=True)]
    _, _, rewards = await eng.score_texts(loaded.scorer.name, texts, enforce_queue_limit=False)
    return rewards


@pytest.fixture(scope="module")
def service(plain_server: RewardServer) -> Iterator[ServiceReward]:
    source = ServiceReward(plain_server.grpc_target, timeout_s=60)
    yield source
    source.close()


@pytest.mark.parametrize("model", [None, "rm-b"])
@pytest.mark.parametrize("prompts", [MESSAGES, PLAIN], ids=["messages", "plain"])
async def test_service_reward_equals_in_process(plain_server, engine, model, prompts) -> None:
    with ServiceReward(plain_server.grpc_target, reward_model=model) as source:
        got = source.score(prompts, RESPONSES)
        assert source.model == (model or "rm-a")
    want = await in_process(engine, model, prompts, RESPONSES)
    assert got == pytest.approx(want, rel=REL)
    assert len(set(got)) == len(got)  # distinct rollouts, distinct rewards: not a constant


async def test_empty_responses_score_as_best_of_n_would(service, engine) -> None:
    prompts, responses = [*PLAIN, *MESSAGES], ["", "", "", ""]
    got = service.score(prompts, responses)
    want = await in_process(engine, None, prompts, responses)
    assert got == pytest.approx(want, rel=REL)


async def test_many_requests_in_chunks_match_one(plain_server, service) -> None:
    prompts = [*PLAIN, *MESSAGES] * 3
    responses = [f"answer {i}" for i in range(len(prompts))]
    with ServiceReward(plain_server.grpc_target, items_per_request=5) as chunked:
        assert chunked.score(prompts, responses) == pytest.approx(
            service.score(prompts, responses), rel=REL
        )


def test_single_model_batch_has_no_members_or_uncertainty(service) -> None:
    """A single reward model over gRPC: rewards as score() gives them, no members, no
    uncertainty, so the trainer behaves exactly as without ensembles."""
    batch = service.score_batch(PLAIN, RESPONSES)
    assert batch.rewards == service.score(PLAIN, RESPONSES)
    assert batch.members is None and batch.uncertainty is None and not batch.is_ensemble
    assert service.ensemble is None  # the model list does not tell: the first batch does


def test_unknown_reward_model_fails_at_construction(plain_server) -> None:
    with pytest.raises(NotFound) as info:
        ServiceReward(plain_server.grpc_target, reward_model="no-such-rm")
    assert info.value.field == "reward_model"


def test_mismatched_lengths_are_refused(service) -> None:
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        service.score(PLAIN, ["only one"])


# ---- OpenRLHF /get_reward --------------------------------------------------------------------


def test_openrlhf_reward_against_get_reward(plain_server, plain_http, service) -> None:
    prompts = [*PLAIN, *MESSAGES]
    responses = [*RESPONSES, *RESPONSES]
    with OpenRLHFReward(plain_server.url_for("/get_reward"), timeout_s=60) as source:
        got = source.score(prompts, responses, labels=["a", None, 3, "b"])
    texts = [hh_text(p, r) for p, r in zip(prompts, responses, strict=True)]
    body = {"items": [{"text": t} for t in texts]}
    want = [r["reward"] for r in plain_http.post("/v1/score", json=body).json()["results"]]
    assert got == want  # the same texts, the same batch: the same floats
    # rm-a has no chat template: HH text is exactly what the service renders for these rollouts
    assert got == pytest.approx(service.score(prompts, responses), rel=REL)


class Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted (status, headers, body), then 200."""

    script: ClassVar[list[tuple[int, dict[str, str], dict]]] = []
    bodies: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if self.script:
            status, headers, answer = self.script.pop(0)
        else:
            status, headers, answer = 200, {}, {"rewards": [0.25] * len(body["query"])}
        data = json.dumps(answer).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[type[Scripted], str]]:
    handler = type("Handler", (Scripted,), {"script": [], "bodies": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{srv.server_address[1]}/get_reward"
    srv.shutdown()
    srv.server_close()


OVERLOADED = {"error": {"code": "overloaded", "message": "queue full", "field": None}}
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, jitter=0.0)


def test_openrlhf_reward_retries_429_and_503(scripted) -> None:
    handler, url = scripted
    handler.script = [(429, {"Retry-After": "0.2"}, OVERLOADED), (503, {}, {"detail": "down"})]
    with OpenRLHFReward(url, timeout_s=10, retry=FAST) as source:
        assert source.score(PLAIN, RESPONSES) == [0.25, 0.25]
    assert len(handler.bodies) == 3
    assert handler.bodies[0] == {
        "query": [hh_text(p, r) for p, r in zip(PLAIN, RESPONSES, strict=True)],
        "prompts": [p.prompt for p in PLAIN],
    }


def test_openrlhf_reward_gives_up_after_max_attempts(scripted) -> None:
    handler, url = scripted
    handler.script = [(429, {"Retry-After": "0.1"}, OVERLOADED)] * 5
    source = OpenRLHFReward(url, timeout_s=10, retry=FAST)
    with source, pytest.raises(ResourceExhausted) as info:
        source.score(PLAIN, RESPONSES)
    assert (info.value.retry_after, info.value.attempts, len(handler.bodies)) == (0.1, 3, 3)


def test_openrlhf_reward_does_not_retry_a_bad_request(scripted) -> None:
    handler, url = scripted
    bad = {"error": {"code": "invalid_argument", "message": "query: bad", "field": "query"}}
    handler.script = [(422, {}, bad)]
    source = OpenRLHFReward(url, timeout_s=10, retry=FAST)
    with source, pytest.raises(InvalidArgument) as info:
        source.score(PLAIN, RESPONSES)
    assert info.value.field == "query" and len(handler.bodies) == 1
