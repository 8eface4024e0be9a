"""A PPO job on the default stack from the README's curl example runs to success, and
Best-of-N on its policy answers.

The default stack: the real default models (minilm-hh-harmless scores, smollm2-135m-instruct
is trained), served as `make serve` serves them (policy backend auto: vLLM where installed),
with a private data dir and a private copy of models/ so the exported policy does not land
in the checkout. The job's rollouts run on vLLM in its worker (rollout_backend auto).

Each phase's duration is printed (`pytest -s` shows it): on 2 busy cores the worker's and
the service's vLLM engine starts (the latter when the new policy is registered) dominate.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from default_models import ROOT, default_models_server
from servers import RewardServer

# README.md's "Training jobs" curl example must stay identical to this body
# (test_readme_curl_body_is_the_one_tested checks it).
README_JOB = {
    "type": "ppo",
    "config": {
        "total_steps": 4,
        "batch_size": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 24,
        "checkpoint_every": 2,
    },
    "prompts": [
        "How do I keep my houseplants alive?",
        "What is a good way to start running?",
        "How can I be a better listener?",
        "What should I pack for a day hike?",
        "How do I make a budget?",
    ],
}
README_CURL = re.compile(r"curl -s localhost:8000/v1/jobs(?![\w/?])")

# Two vLLM engine starts (worker, then the service's for the new policy) at 30-60 s each on
# 2 busy cores, model loads and four PPO steps: generous, as a busy CI machine needs.
JOB_TIMEOUT_S = 1200.0
BON_TIMEOUT_S = 300.0
TERMINAL = {"succeeded", "failed", "cancelled"}


def readme_curl_body(readme: str) -> dict[str, Any] | None:
    """The JSON body of the README's `curl -s localhost:8000/v1/jobs` example (None if the
    README has none): the first JSON object after that command, within its code block."""
    m = README_CURL.search(readme)
    if m is None:
        return None
    rest = readme[m.end() :]
    block = rest.split("```", 1)[0]
    start = block.find("{")
    assert start >= 0, f"no JSON body after {m.group(0)!r} in README.md's code block"
    body, _ = json.JSONDecoder().raw_decode(block[start:])
    return body


def test_readme_curl_body_is_the_one_tested() -> None:
    readme = (ROOT / "README.md").read_text()
    body = readme_curl_body(readme)
    if body is None:
        pytest.skip("README.md has no `curl -s localhost:8000/v1/jobs` example yet")
    assert body == README_JOB, "README.md's jobs curl body and README_JOB differ"


class EventLog:
    """The job's SSE stream read in a thread, each event stamped with its arrival time
    (time.monotonic()); the stream ends after the terminal status event."""

    def __init__(self, server: RewardServer, job_id: str) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self._url = server.url_for(f"/v1/jobs/{job_id}/events")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            timeout = httpx.Timeout(30, read=JOB_TIMEOUT_S)
            with (
                httpx.Client(timeout=timeout, trust_env=False) as client,
                client.stream("GET", self._url) as resp,
            ):
                resp.raise_for_status()
                kind = None
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and kind is not None:
                        data = json.loads(line.split(":", 1)[1])["data"]
                        self.events.append((time.monotonic(), kind, data))
        except Exception as e:  # the test reports it
            self.error = e

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, d) for t, k, d in self.events if k == kind]


@pytest.fixture(scope="module")
def jobs_server() -> Iterator[RewardServer]:
    # Its own server: the job adds a policy to the repository (and the service loads it).
    with default_models_server("auto", private_repository=True) as server:
        yield server


def print_phases(phases: list[tuple[str, float]]) -> None:
    print("\nPPO job on the default stack (README example), seconds:")
    for name, seconds in phases:
        print(f"  {name:<34} {seconds:7.1f}")


def test_readme_ppo_job_succeeds_and_its_policy_serves_best_of_n(
    jobs_server: RewardServer,
) -> None:
    with jobs_server.http() as client:
        t_post = time.monotonic()
        r = client.post("/v1/jobs", json=README_JOB)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        events = EventLog(jobs_server, job_id)
        try:
            ended = events.wait(JOB_TIMEOUT_S)
            job = client.get(f"/v1/jobs/{job_id}").json()
        finally:
            # A worker outlives its service by design: never leave one running.
            if client.get(f"/v1/jobs/{job_id}").json()["status"] not in TERMINAL:
                client.post(f"/v1/jobs/{job_id}/cancel")
        logs = client.get(f"/v1/jobs/{job_id}/logs", params={"tail_bytes": 6000}).text
        assert ended, f"job not done after {JOB_TIMEOUT_S:.0f}s: {job}\n{logs}"
        assert events.error is None, repr(events.error)
        assert job["status"] == "succeeded", f"{job['error']}\n{logs}"

        steps = events.of("step")
        assert [d["step"] for _, d in steps] == [1, 2, 3, 4]
        assert all(d["samples"] for _, d in steps)
        assert [d["step"] for _, d in events.of("checkpoint")] == [2, 4]
        (t_done, done), *_ = [(t, d) for t, d in events.of("status") if d["status"] in TERMINAL]
        policy = done["result"]["policy"]
        assert policy == job["result"]["policy"]

        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models[policy]["status"] == "loaded", models[policy]
        exported = Path(jobs_server.model_repository) / policy
        assert (exported / "model.yaml").is_file()
        assert not (ROOT / "models" / policy).exists(), "the export landed in the checkout"

        r = client.post(
            "/v1/best-of-n",
            json={"policy": policy, "prompt": README_JOB["prompts"][0], "n": 2, "max_tokens": 16},
            timeout=BON_TIMEOUT_S,
        )
        t_bon = time.monotonic()

    t_first, t_last = steps[0][0], steps[-1][0]
    print_phases(
        [
            ("POST -> first step event", t_first - t_post),
            ("first step -> last step (3 steps)", t_last - t_first),
            ("last step -> succeeded", t_done - t_last),
            ("succeeded -> best-of-n answered", t_bon - t_done),
            ("total", t_bon - t_post),
        ]
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == policy
    assert body["results"][0]["candidates"], body
