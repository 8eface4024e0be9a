"""Settings as `rewardserve serve` parses them: flags, env vars and list fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from rewardserve.config import Settings


def parse(*args: str) -> Settings:
    return CliApp.run(Settings, cli_args=list(args), cli_prog_name="rewardserve serve")


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
    assert s.key_scopes() == {"s1": {"score"}, "a1": {"admin"}, "both": {"score", "admin"}}


def test_api_keys_flag_with_semicolons_and_scope_lists() -> None:
    s = parse("--api-keys", "s1:score;a1:score,admin")
    assert s.key_scopes() == {"s1": {"score"}, "a1": {"score", "admin"}}


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
    assert s.key_scopes() == {"s1": {"score"}, "a1": {"admin"}}
