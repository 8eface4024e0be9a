"""A Llama-3-style reward model (chat template, BOS, no pad token) behind a real server: the
same tokens and rewards on both transports and through OpenRLHF's route, and a template that
refuses the messages is a 400 / INVALID_ARGUMENT naming them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from transformers import AutoTokenizer

from builders import build_tiny_llama_rm
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request, pb_response_dict

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "is the sky blue?"},
    {"role": "assistant", "content": "yes, it is blue"},
]
OUT_OF_ORDER = [{"role": "assistant", "content": "I speak first"}]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat") / "models"
    folder = build_tiny_llama_rm(root, "llama-rm")
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump(raw | {"default": True}))
    return root


@pytest.fixture(scope="module")
def clients(repo: Path) -> Iterator[tuple[httpx.Client, scoring_pb2_grpc.RewardServiceStub]]:
    with RewardServer(repo) as s, s.http() as http, grpc.insecure_channel(s.grpc_target) as ch:
        yield http, scoring_pb2_grpc.RewardServiceStub(ch)


def test_messages_and_their_rendered_text_score_alike_everywhere(repo: Path, clients) -> None:
    http, stub = clients
    tok = AutoTokenizer.from_pretrained(repo / "llama-rm" / "weights")
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    n_tokens = len(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    body = {"model": "llama-rm", "items": [{"messages": CHAT}, {"text": rendered}]}
    r = http.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    rest = r.json()
    assert [x["tokens"] for x in rest["results"]] == [n_tokens, n_tokens]  # one BOS each
    assert rest["results"][0]["reward"] == pytest.approx(rest["results"][1]["reward"], abs=1e-6)
    assert pb_response_dict(stub.Score(pb_request(body), timeout=30)) == rest
    # OpenRLHF sends the decoded query with its special tokens
    r = http.post("/get_reward", json={"query": [rendered]})
    assert r.status_code == 200, r.text
    assert r.json()["rewards"][0] == pytest.approx(rest["results"][0]["reward"], abs=1e-6)


def test_a_refused_template_is_a_400_on_both_transports(clients) -> None:
    http, stub = clients
    body = {"model": "llama-rm", "items": [{"messages": CHAT}, {"messages": OUT_OF_ORDER}]}
    r = http.post("/v1/score", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == "items.1.messages" and "alternate" in err["message"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb_request(body), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("error-field", "items.1.messages") in tuple(info.value.trailing_metadata())
    assert "alternate" in (info.value.details() or "")
    assert http.post("/v1/score", json={"items": [{"messages": CHAT}]}).status_code == 200
