"""Drop-in routes, with the exact payloads OpenRLHF and vLLM/verl clients send."""

from __future__ import annotations

import math

import httpx
import pytest

QUERIES = [
    "<|user|>\nwhat is 2+2?\n<|assistant|>\n4",
    "<|user|>\nwrite a long poem\n<|assistant|>\n" + "roses are red violets are blue " * 5,
    "short",
]


def raw_rewards(http: httpx.Client, texts: list[str], model: str | None = None) -> list[float]:
    r = http.post("/v1/score", json={"model": model, "items": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    return [x["reward"] for x in r.json()["results"]]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- OpenRLHF --remote_rm_url ------------------------------------------------------------


def test_openrlhf_get_reward(plain_http) -> None:
    payload = {"query": QUERIES, "prompts": ["p1", "p2", "p3"], "labels": ["4", None, 3]}
    r = plain_http.post("/get_reward", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    expected = raw_rewards(plain_http, QUERIES)  # the default model, same batch of texts
    assert body["rewards"] == expected
    assert body["scores"] == expected
    assert body["extra_logs"] == {}


def test_openrlhf_query_only(plain_http) -> None:
    r = plain_http.post("/get_reward", json={"query": QUERIES[:1]})
    assert r.status_code == 200, r.text
    assert r.json()["rewards"] == raw_rewards(plain_http, QUERIES[:1])


def test_openrlhf_ignores_fields_of_newer_clients(plain_http) -> None:
    payload = {
        "query": QUERIES,
        "prompts": QUERIES,
        "labels": [None] * 3,
        "metadata": {"step": 3},
        "n_samples_per_prompt": 1,
    }
    r = plain_http.post("/get_reward", json=payload)
    assert r.status_code == 200, r.text
    assert r.json()["rewards"] == raw_rewards(plain_http, QUERIES)


def test_openrlhf_prompt_count_mismatch(plain_http) -> None:
    r = plain_http.post("/get_reward", json={"query": QUERIES, "prompts": ["only one"]})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "prompts"


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"query": []}, "query"), ({"query": "not a list"}, "query"), ({"query": [1]}, "query.0")],
)
def test_openrlhf_bad_query(plain_http, payload, field) -> None:
    r = plain_http.post("/get_reward", json=payload)
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["field"] == field


# ---- vLLM /classify (verl's reward loop) ---------------------------------------------------


def test_classify_single_string_raw(plain_http) -> None:
    r = plain_http.post(
        "/classify", json={"model": "rm-a", "input": QUERIES[0], "use_activation": False}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == "rm-a"
    assert body["id"].startswith("classify-")
    assert isinstance(body["created"], int)
    (item,) = body["data"]
    assert item["index"] == 0
    assert item["num_classes"] == 1
    assert item["probs"] == raw_rewards(plain_http, QUERIES[:1], "rm-a")
    tokens = plain_http.post("/v1/score", json={"items": [{"text": QUERIES[0]}]}).json()
    assert body["usage"]["prompt_tokens"] == tokens["usage"]["prompt_tokens"]
    assert body["usage"]["total_tokens"] == tokens["usage"]["total_tokens"]
    assert body["usage"]["completion_tokens"] == 0


def test_classify_list_raw_and_with_activation(plain_http) -> None:
    raw = raw_rewards(plain_http, QUERIES, "rm-b")
    r = plain_http.post("/classify", json={"model": "rm-b", "input": QUERIES, "use_activation": 0})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert [d["probs"] for d in data] == [[x] for x in raw]
    assert all(d["num_classes"] == 1 for d in data)

    r = plain_http.post(
        "/classify", json={"model": "rm-b", "input": QUERIES, "use_activation": True}
    )
    assert r.status_code == 200, r.text
    probs = [d["probs"][0] for d in r.json()["data"]]
    assert probs == pytest.approx([sigmoid(x) for x in raw], abs=1e-12)
    assert all(0 < p < 1 for p in probs)


@pytest.mark.parametrize(
    ("flags", "activated"),
    [
        ({}, False),
        ({"activation": False}, False),
        ({"activation": True}, True),
        ({"use_activation": False, "activation": True}, False),
        ({"use_activation": True, "activation": False}, True),
    ],
)
def test_classify_activation_flags(plain_http, flags, activated) -> None:
    (raw,) = raw_rewards(plain_http, QUERIES[:1], "orlhf")
    r = plain_http.post("/classify", json={"model": "orlhf", "input": [QUERIES[0]], **flags})
    assert r.status_code == 200, r.text
    (prob,) = r.json()["data"][0]["probs"]
    assert prob == pytest.approx(sigmoid(raw) if activated else raw, abs=1e-12)
    assert raw != pytest.approx(sigmoid(raw), abs=1e-3)  # the two are distinguishable


def test_classify_without_model_uses_the_default(plain_http) -> None:
    r = plain_http.post("/classify", json={"input": QUERIES[0]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "rm-a"
    assert r.json()["data"][0]["probs"] == raw_rewards(plain_http, QUERIES[:1], "rm-a")


def test_classify_ignores_fields_of_newer_clients(plain_http) -> None:
    payload = {
        "model": "rm-a",
        "input": QUERIES,
        "use_activation": False,
        "truncate_prompt_tokens": -1,
        "priority": 0,
        "user": "verl",
        "request_id": "abc",
        "add_special_tokens": True,
    }
    r = plain_http.post("/classify", json=payload)
    assert r.status_code == 200, r.text
    assert [d["probs"][0] for d in r.json()["data"]] == raw_rewards(plain_http, QUERIES, "rm-a")


def test_classify_unknown_model(plain_http) -> None:
    r = plain_http.post("/classify", json={"model": "Qwen/Qwen2.5-RM", "input": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "model"


@pytest.mark.parametrize("bad", [5, [1, 2], None], ids=["number", "list of numbers", "null"])
def test_classify_non_string_input_names_input(plain_http, bad) -> None:
    r = plain_http.post("/classify", json={"model": "rm-a", "input": bad})
    assert r.status_code == 422
    assert r.json()["error"]["field"] in ("input", "input.0")


@pytest.mark.parametrize("bad", ["", []], ids=["empty string", "empty list"])
def test_classify_empty_input_names_input(plain_http, bad) -> None:
    r = plain_http.post("/classify", json={"model": "rm-a", "input": bad})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "input"


@pytest.mark.parametrize("bad", [5, [1, 2], None, "", []])
def test_classify_bad_input_is_a_4xx_not_a_500(plain_http, bad) -> None:
    r = plain_http.post("/classify", json={"model": "rm-a", "input": bad})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_argument"
    assert err["field"] in ("input", "input.0", "input.str", "body")
