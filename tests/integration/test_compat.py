"""Drop-in routes, with the exact payloads OpenRLHF and vLLM/verl clients send."""

from __future__ import annotations

import base64
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from rewardserve.v1 import bon_pb2 as bpb
from rewardserve.v1 import bon_pb2_grpc, scoring_pb2_grpc
from rewardserve.v1 import scoring_pb2 as pb
from servers import RewardServer

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
    return 1 / (1 + math.exp(-x))  # fine for the small rewards of the plain server's models


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


# vLLM 0.32's classify: PoolingParams(use_activation=None) becomes True for task "classify"
# (pooling_params.py, _set_default_parameters), and a one-label classifier's activation is a
# sigmoid (model_executor/layers/pooler/activations.py, PoolerClassify). So a request without
# either flag gets sigmoid(reward); only an explicit false gets the raw reward.
@pytest.mark.parametrize(
    ("flags", "activated"),
    [
        ({}, True),
        ({"use_activation": None}, True),
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
    r = plain_http.post("/classify", json={"input": QUERIES[0], "use_activation": False})
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


# ---- verl's reward loop, exactly as verl 0.9.1 sends it --------------------------------------
# verl/experimental/reward_loop/reward_loop.py, RewardLoopWorker.compute_score_disrm: `model` is
# config.reward.reward_model.model_path (the path or hub id verl loads the reward model's
# tokenizer from), `input` one chat-templated string with the BOS stripped; the vLLM branch
# posts to /classify with use_activation false and reads data[-1].probs[-1], the SGLang branch
# posts to /v1/embeddings and reads data[-1].embedding[-1].

HUB_ID = "OpenRLHF/Llama-3-8b-rm-700k"
POLICY_ALIAS = "HuggingFaceTB/tiny-policy"
VERL_PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\nwhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)
HUGE_BIAS = -5000.0  # rewards far below -710, where exp(-reward) overflows a float


def edit_manifest(folder: Path, **fields: object) -> None:
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump(raw | fields))


def build_huge_rm(root: Path) -> None:
    """rm-a's weights with a head bias of HUGE_BIAS: every reward is about -5000."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "rm-a", root / "rm-huge")
    edit_manifest(root / "rm-huge", name="rm-huge", default=False)
    path = root / "rm-huge" / "weights" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["classifier.bias"] = torch.full_like(tensors["classifier.bias"], HUGE_BIAS)
    save_file(tensors, str(path), metadata={"format": "pt"})


def build_tiny_policy(root: Path) -> None:
    """A real (random) GPT-2 on the MiniLM tokenizer, served by the transformers backend."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from builders import minilm_dir, write_manifest

    weights = root / "tiny-policy" / "weights"
    config = GPT2Config(
        vocab_size=30522, n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(weights)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(weights)
    write_manifest(
        root / "tiny-policy",
        name="tiny-policy",
        kind="policy",
        aliases=[POLICY_ALIAS],
        source={"kind": "repository", "path": "weights"},
        max_length=128,
        policy={"backend": "transformers"},
    )


@pytest.fixture(scope="module")
def compat_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """The plain repository plus: rm-b answers to its weights' local path and a hub id,
    policy-x to "org/policy-x", rm-huge scores about -5000, tiny-policy generates."""
    root = tmp_path_factory.mktemp("compat") / "models"
    shutil.copytree(model_repo, root)
    edit_manifest(root / "rm-b", aliases=[str(root / "rm-b" / "weights"), HUB_ID])
    edit_manifest(root / "policy-x", aliases=["org/policy-x"])
    build_huge_rm(root)
    build_tiny_policy(root)
    with RewardServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def compat_http(compat_server: RewardServer) -> Iterator[httpx.Client]:
    with compat_server.http() as client:
        yield client


@pytest.fixture(scope="module")
def local_path(compat_server: RewardServer) -> str:
    return str(compat_server.model_repository / "rm-b" / "weights")


def test_verl_vllm_classify_payload_with_a_local_path(compat_http, local_path) -> None:
    payloads = {"model": local_path, "input": VERL_PROMPT, "use_activation": False}
    r = compat_http.post("/classify", json=payloads)
    assert r.status_code == 200, r.text
    output = r.json()
    rm_score = output["data"][-1]["probs"][-1]
    assert rm_score == raw_rewards(compat_http, [VERL_PROMPT], "rm-b")[0]
    assert rm_score != raw_rewards(compat_http, [VERL_PROMPT], "rm-a")[0]  # not the default
    assert output["model"] == "rm-b"


@pytest.mark.parametrize("name", ["local path", "hub id"])
def test_verl_sglang_embeddings_payload(compat_http, local_path, name) -> None:
    payloads = {"model": local_path if name == "local path" else HUB_ID, "input": VERL_PROMPT}
    r = compat_http.post("/v1/embeddings", json=payloads)
    assert r.status_code == 200, r.text
    output = r.json()
    rm_score = output["data"][-1]["embedding"][-1]
    assert rm_score == raw_rewards(compat_http, [VERL_PROMPT], "rm-b")[0]
    tokens = compat_http.post(
        "/v1/score", json={"model": "rm-b", "items": [{"text": VERL_PROMPT}]}
    ).json()["usage"]["prompt_tokens"]
    assert output == {  # the OpenAI embeddings shape, all of it
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [rm_score]}],
        "model": "rm-b",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def test_embeddings_of_a_list_and_as_base64(compat_http) -> None:
    raw = raw_rewards(compat_http, QUERIES, "rm-b")
    r = compat_http.post("/v1/embeddings", json={"model": HUB_ID, "input": QUERIES})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [(d["index"], d["embedding"]) for d in data] == [(i, [x]) for i, x in enumerate(raw)]
    # the OpenAI Python client asks for base64 (little-endian float32) unless told otherwise
    body = {"model": HUB_ID, "input": QUERIES, "encoding_format": "base64", "user": "u"}
    r = compat_http.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    decoded = [struct.unpack("<f", base64.b64decode(d["embedding"]))[0] for d in r.json()["data"]]
    assert decoded == pytest.approx(raw, rel=1e-6)


def test_embeddings_without_model_use_the_default(compat_http) -> None:
    r = compat_http.post("/v1/embeddings", json={"input": VERL_PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "rm-a"
    assert r.json()["data"][0]["embedding"] == raw_rewards(compat_http, [VERL_PROMPT], "rm-a")


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"model": "Qwen/Qwen2.5-RM", "input": "x"}, 404, "model"),
        ({"model": HUB_ID, "input": [101, 2054]}, 422, "input.0"),  # token ids: not served
        ({"model": HUB_ID, "input": ""}, 422, "input"),
        ({"model": HUB_ID, "input": []}, 422, "input"),
        ({"model": HUB_ID}, 422, "input"),
        ({"model": HUB_ID, "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"model": HUB_ID, "input": ["x"] * 513}, 400, "input"),  # --max-items-per-request
        ({"model": HUB_ID, "input": ["x", "y" * 200_001]}, 400, "input.1"),  # --max-text-chars
    ],
)
def test_embeddings_bad_requests_name_the_field(compat_http, body, status, field) -> None:
    r = compat_http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


# ---- /classify with rewards far beyond exp()'s range -------------------------------------------


def test_classify_activation_of_huge_negative_rewards(compat_http) -> None:
    raw = raw_rewards(compat_http, QUERIES, "rm-huge")
    assert all(x < -710 for x in raw)  # math.exp(-x) overflows for each of them
    r = compat_http.post("/classify", json={"model": "rm-huge", "input": QUERIES})
    assert r.status_code == 200, r.text
    probs = [d["probs"][0] for d in r.json()["data"]]
    assert probs == [0.0, 0.0, 0.0]  # sigmoid(-5000) is 0 to double precision, not an error
    r = compat_http.post(
        "/classify", json={"model": "rm-huge", "input": QUERIES, "use_activation": False}
    )
    assert [d["probs"][0] for d in r.json()["data"]] == raw


# ---- aliases on every route that takes a model name -----------------------------------------


def test_models_list_their_aliases(compat_http, compat_server, local_path) -> None:
    listed = {m["id"]: m for m in compat_http.get("/v1/models").json()["data"]}
    assert listed["rm-b"]["aliases"] == [local_path, HUB_ID]
    assert listed["rm-a"]["aliases"] == []
    assert listed["tiny-policy"]["aliases"] == [POLICY_ALIAS]
    with grpc.insecure_channel(compat_server.grpc_target) as channel:
        models = scoring_pb2_grpc.RewardServiceStub(channel).ListModels(pb.ListModelsRequest())
    by_id = {m.id: list(m.aliases) for m in models.models}
    assert by_id["rm-b"] == [local_path, HUB_ID] and by_id["tiny-policy"] == [POLICY_ALIAS]


def test_score_and_rerank_take_aliases_on_both_transports(compat_http, compat_server) -> None:
    expected = raw_rewards(compat_http, QUERIES[:2], "rm-b")
    assert raw_rewards(compat_http, QUERIES[:2], HUB_ID) == expected
    r = compat_http.post(
        "/v1/rerank", json={"reward_model": HUB_ID, "prompt": "", "candidates": QUERIES[:2]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["reward_model"] == "rm-b"
    assert sorted(x["reward"] for x in r.json()["results"]) == sorted(expected)
    with grpc.insecure_channel(compat_server.grpc_target) as channel:
        score = scoring_pb2_grpc.RewardServiceStub(channel).Score(
            pb.ScoreRequest(model=HUB_ID, items=[pb.ScoreItem(text=t) for t in QUERIES[:2]])
        )
        rerank = bon_pb2_grpc.BestOfNServiceStub(channel).Rerank(
            bpb.RerankRequest(reward_model=HUB_ID, prompt="", candidates=QUERIES[:2])
        )
    assert score.model == "rm-b" and [x.reward for x in score.results] == expected
    assert rerank.reward_model == "rm-b"


def test_best_of_n_takes_aliases_for_policy_and_reward_model(compat_http, compat_server) -> None:
    body = {
        "policy": POLICY_ALIAS,
        "reward_model": HUB_ID,
        "prompt": "\n\nHuman: hi\n\nAssistant:",
        "n": 2,
        "max_tokens": 4,
        "seed": 1,
        "return_all": True,
    }
    r = compat_http.post("/v1/best-of-n", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["policy"], out["reward_model"]) == ("tiny-policy", "rm-b")
    (result,) = out["results"]
    texts = [c["text"] for c in result["candidates"]]
    rescored = compat_http.post(
        "/v1/rerank", json={"reward_model": "rm-b", "prompt": body["prompt"], "candidates": texts}
    ).json()["results"]
    assert sorted(c["reward"] for c in result["candidates"]) == sorted(
        x["reward"] for x in rescored
    )  # the candidates were scored by rm-b, the model the alias names
    with grpc.insecure_channel(compat_server.grpc_target) as channel:
        resp = bon_pb2_grpc.BestOfNServiceStub(channel).BestOfN(
            bpb.BestOfNRequest(
                policy=POLICY_ALIAS,
                reward_model=HUB_ID,
                prompts=[bpb.PromptInput(prompt=body["prompt"])],
                n=2,
                max_tokens=4,
                seed=1,
            )
        )
    assert (resp.policy, resp.reward_model) == ("tiny-policy", "rm-b")


def test_policy_alias_of_a_policy_without_weights(compat_http) -> None:
    body = {"policy": "org/policy-x", "prompt": "\n\nHuman: hi\n\nAssistant:", "n": 2}
    r = compat_http.post("/v1/best-of-n", json=body)
    assert r.status_code == 503, r.text
    assert "policy-x" in r.json()["error"]["message"]


def test_admin_load_and_unload_take_aliases(compat_http, local_path) -> None:
    r = compat_http.post("/v1/admin/models/unload", json={"model": local_path})
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["status"]) == ("rm-b", "available")
    try:
        r = compat_http.post("/classify", json={"model": local_path, "input": "x"})
        assert r.status_code == 404
        assert r.json()["error"]["field"] == "model"
    finally:
        r = compat_http.post("/v1/admin/models/load", json={"model": HUB_ID})
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["status"]) == ("rm-b", "loaded")
    assert compat_http.post("/v1/embeddings", json={"model": local_path, "input": "x"}).is_success


def test_openai_client_embeddings(compat_server, compat_http) -> None:
    """The OpenAI Python client, which asks for base64 unless told otherwise."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=compat_server.url_for("v1"), api_key="unused", max_retries=0)
    resp = client.embeddings.create(model=HUB_ID, input=QUERIES)
    raw = raw_rewards(compat_http, QUERIES, "rm-b")
    assert [d.embedding for d in resp.data] == [pytest.approx([x], rel=1e-6) for x in raw]
    assert resp.model == "rm-b" and resp.usage.prompt_tokens > 0
