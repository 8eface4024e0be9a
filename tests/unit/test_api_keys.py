"""The neutral key check both transports use, and the refusal to serve an exposed address open."""

from __future__ import annotations

import hmac

import pytest

from rewardserve import auth
from rewardserve.auth import ADMIN, ANY, OPEN, SCORE, KeyRing
from rewardserve.config import Settings
from rewardserve.schemas.errors import PermissionDenied, Unauthenticated
from rewardserve.server import check_exposure, is_loopback

RING = KeyRing.from_entries(["s1:score", "a1:admin", "both"])


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic czE6",
        "s1",
        "Bearer s1x",
        "Bearer s",
        "Bearer é",
        "Bearer é".encode(),
        b"Bearer \xe9",
        b"Bearer \xff\xfe",
        b"\xe9 s1",
    ],
)
def test_missing_malformed_or_wrong_keys_are_unauthenticated(authorization) -> None:
    with pytest.raises(Unauthenticated) as info:
        RING.authorize(authorization, SCORE)
    assert info.value.field == "authorization"


def test_scopes() -> None:
    assert RING.authorize("Bearer s1", SCORE) == {SCORE}
    assert RING.authorize(b"bearer  s1 ", SCORE) == {SCORE}
    assert RING.authorize("Bearer both", ADMIN) == {SCORE, ADMIN}
    assert RING.authorize("Bearer a1", ANY) == {ADMIN}
    with pytest.raises(PermissionDenied, match="'admin' scope"):
        RING.authorize("Bearer s1", ADMIN)
    with pytest.raises(PermissionDenied, match="'score' scope"):
        RING.authorize("Bearer a1", SCORE)


def test_open_needs_no_key_and_no_keys_means_open() -> None:
    assert RING.authorize(None, OPEN) == {SCORE, ADMIN}
    assert KeyRing().authorize(None, ADMIN) == {SCORE, ADMIN}
    assert not KeyRing().enabled and RING.enabled


def test_an_unknown_requirement_grants_nothing() -> None:
    with pytest.raises(PermissionDenied):
        RING.authorize("Bearer both", "scroe")


@pytest.mark.parametrize("which", ["s1", "a1", "both", "nope"])
def test_every_key_is_compared_whichever_matches(monkeypatch, which) -> None:
    compared: list[bytes] = []

    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    try:
        RING.authorize(f"Bearer {which}", ANY)
    except Unauthenticated:
        assert which == "nope"
    assert len(compared) == 3
    # digests of equal length are compared, never the plaintext
    assert all(len(c) == 32 for c in compared)


def test_the_same_key_twice_holds_both_scope_lists() -> None:
    ring = KeyRing.from_entries(["k:score", "k:admin"])
    assert ring.authorize("Bearer k", ADMIN) == {SCORE, ADMIN}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("myhost.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposed_bind_without_keys_is_refused() -> None:
    with pytest.raises(SystemExit) as info:
        check_exposure(Settings(host="0.0.0.0"))
    message = str(info.value.code)
    assert "0.0.0.0" in message and "--api-keys" in message and "--allow-insecure" in message
    check_exposure(Settings(host="0.0.0.0", api_keys=["k"]))
    check_exposure(Settings(host="0.0.0.0", allow_insecure=True))
    check_exposure(Settings(host="127.0.0.1"))


def test_a_websocket_without_a_key_is_refused(tmp_path) -> None:
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from rewardserve.http.app import build_app

    app = build_app(Settings(model_repository=tmp_path, api_keys=["k"]))
    with pytest.raises(WebSocketDisconnect) as info, TestClient(app).websocket_connect("/v1/x"):
        pass
    assert info.value.code == 1008


def test_an_undeclared_route_needs_admin(tmp_path) -> None:
    from starlette.testclient import TestClient

    from rewardserve.http.app import build_app

    app = build_app(Settings(model_repository=tmp_path, api_keys=["s1:score", "a1:admin"]))

    @app.post("/v1/admin/wipe")  # a new route whose author forgot its scope
    async def wipe() -> dict[str, bool]:
        return {"wiped": True}

    client = TestClient(app)
    assert client.post("/v1/admin/wipe").status_code == 401
    assert client.post("/v1/admin/wipe", headers={"Authorization": "Bearer s1"}).status_code == 403
    assert client.post("/v1/admin/wipe", headers={"Authorization": "Bearer a1"}).json() == {
        "wiped": True
    }


def test_an_undeclared_rpc_needs_admin() -> None:
    import asyncio

    import grpc

    from rewardserve.grpc.auth import ApiKeyInterceptor, rpc_scope

    method = "/rewardserve.v1.AdminService/Wipe"
    assert rpc_scope(method) is None

    async def wipe(request: bytes, context) -> bytes:
        return b"wiped"

    async def main() -> list[grpc.StatusCode | bytes]:
        keys = KeyRing.from_entries(["s1:score", "a1:admin"])
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys)])
        handler = grpc.unary_unary_rpc_method_handler(wipe)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "rewardserve.v1.AdminService", {"Wipe": handler}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[grpc.StatusCode | bytes] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(method)
                for key in ("s1", "a1"):
                    try:
                        md = (("authorization", f"Bearer {key}"),)
                        out.append(await call(b"", metadata=md, timeout=10))
                    except grpc.aio.AioRpcError as e:
                        out.append(e.code())
        finally:
            await server.stop(None)
        return out

    assert asyncio.run(main()) == [grpc.StatusCode.PERMISSION_DENIED, b"wiped"]
