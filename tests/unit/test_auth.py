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
