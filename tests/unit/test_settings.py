"""Settings as `rewardserve serve` parses them: flags, env vars and list fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from rewardserve.auth import digest
from rewardserve.config import Settings


def parse(*args: str) -> Settings:
    return CliApp.run(Settings, cli_args=list(args), cli_prog_name="rewardserve serve")


def hashed(key: str, scopes: str = "admin,score") -> str:
    """A key as the setting keeps it once parsed: its digest and its sorted scopes."""
    return f"sha256:{digest(key)}:{scopes}"


def test_kebab_case_flags() -> None:
    s = parse(
        "--port", "9001", "--grpc-port", "9002", "--max-items-per-request", "7",
        "--max-body-bytes", "4096", "--max-queue-items", "3", "--no-grpc-enabled",
    )  # fmt: skip
    assert (s.port, s.grpc_port, s.max_items_per_request) == (9001, 9002, 7)
    assert (s.max_body_bytes, s.max_queue_items, s.grpc_enabled) == (4096, 3, False)


def test_flag_bounds_are_enforced() -> None:
    with pytest.raises(ValidationError) as info:
        parse("--max-body-bytes", "10")
    assert info.value.errors()[0]["loc"] == ("max_body_bytes",)


def test_api_keys_from_env_separated_by_semicolons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDSERVE_API_KEYS", "s1:score; a1:admin ;both")
    s = Settings()
    assert s.api_keys == [hashed("s1", "score"), hashed("a1", "admin"), hashed("both")]


def test_api_keys_flag_with_semicolons_and_scope_lists() -> None:
    s = parse("--api-keys", "s1:score;a1:score,admin")
    assert s.api_keys == [hashed("s1", "score"), hashed("a1")]


def test_models_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDSERVE_MODELS", "rm-a;rm-b")
    assert Settings().models == ["rm-a", "rm-b"]


@pytest.mark.parametrize(
    "args",
    [("--models", "rm-a", "--models", "rm-b"), ("--models", '["rm-a","rm-b"]')],
    ids=["repeated", "json"],
)
def test_models_list_flag(args: tuple[str, ...]) -> None:
    assert parse(*args).models == ["rm-a", "rm-b"]


def test_api_keys_repeated_flag() -> None:
    s = parse("--api-keys", "s1:score", "--api-keys", "a1:admin")
    assert s.api_keys == [hashed("s1", "score"), hashed("a1", "admin")]


def test_api_keys_are_kept_only_as_digests() -> None:
    s = parse("--api-keys", "plain-secret-1:score;plain-secret-2")
    assert "plain-secret" not in repr(s) + str(s.model_dump())
    # the digest form is accepted as given (a deployment need never hold the plaintext) and
    # parses to itself, so settings can be validated again
    again = Settings(api_keys=s.api_keys)
    assert again.api_keys == s.api_keys
    given = parse("--api-keys", f"sha256:{digest('plain-secret-1')}:score")
    assert given.api_keys == s.api_keys[:1]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('[""]', "an API key is empty"),
        ('["  "]', "an API key is empty"),
        (":score", "an API key is empty"),
        ("s1:", "empty scope list"),
        ("s1: ", "empty scope list"),
        ("s1:score;a1:", "entry 2: an API key has an empty scope list"),
        ("s1:scroe", "unknown scope 'scroe'"),
        ("s1:score,admni", "'admni' after a key with scopes is not a scope"),
        ('["s1:score,"]', "unknown scope ''"),
        ('["s\u00e91"]', "visible ASCII"),
        ('["s 1"]', "visible ASCII"),
        ("sha256:abc:score", "64 hex digits"),
    ],
)
def test_bad_api_keys_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    for how in ("env", "flag"):
        with pytest.raises(ValidationError) as info:
            if how == "env":
                monkeypatch.setenv("REWARDSERVE_API_KEYS", value)
                Settings()
            else:
                monkeypatch.delenv("REWARDSERVE_API_KEYS", raising=False)
                parse("--api-keys", value)
        (error,) = info.value.errors()
        assert error["loc"] == ("api_keys",), how
        assert says in error["msg"], (how, error["msg"])
        # the error never echoes the input: it may hold the other, valid keys
        assert "s1" not in str(info.value).replace("api_keys", ""), how


def test_allow_insecure_is_a_flag() -> None:
    assert parse().allow_insecure is False
    assert parse("--allow-insecure").allow_insecure is True
