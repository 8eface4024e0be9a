"""SIGTERM: admission stops on both transports, in-flight requests finish, exit 0, clean log.

A request is held in flight deterministically by a client that sends half its body, waits
for the signal to land, then sends the rest; a ScoreStream call stays open across the signal.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

BODY = b'{"items": [{"text": "a request that was in flight"}, {"text": "and its second item"}]}'
EXIT_WAIT_S = 90.0


def held_body(release: threading.Event, sent_half: threading.Event) -> Iterator[bytes]:
    # A generator body is sent chunked: the server has the request before its body ends.
    yield BODY[:20]
    sent_half.set()
    release.wait(EXIT_WAIT_S)
    yield BODY[20:]


class HeldRequest:
    """A POST /v1/score in flight from another thread until `release` is set."""

    def __init__(self, server: RewardServer) -> None:
        self.release, self._sent_half = threading.Event(), threading.Event()
        self.response: httpx.Response | None = None
        self.error: httpx.TransportError | None = None
        self._thread = threading.Thread(target=self._post, args=(server,))
        self._thread.start()
        assert self._sent_half.wait(30), "the request never started"

    def _post(self, server: RewardServer) -> None:
        try:
            with server.http() as c:
                self.response = c.post(
                    "/v1/score",
                    content=held_body(self.release, self._sent_half),
                    headers={"Content-Type": "application/json"},
                )
        except httpx.TransportError as e:
            self.error = e

    def finish(self) -> None:
        self.release.set()
        self._thread.join(EXIT_WAIT_S)


def rest_refuses_new_connections(server: RewardServer) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=2) as c:
            c.get(server.url_for("healthz"))
    except httpx.TransportError:
        return True
    return False


def grpc_refuses_new_calls(server: RewardServer) -> bool:
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = scoring_pb2_grpc.RewardServiceStub(ch)
        try:
            stub.Score(pb_request({"items": [{"text": "late"}]}), timeout=2)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


def wait_until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def exit_code(server: RewardServer) -> int:
    assert server.proc is not None
    try:
        return server.proc.wait(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {EXIT_WAIT_S:.0f} s after SIGTERM; log:\n{server.log_tail()}")


def assert_clean_log(server: RewardServer) -> None:
    log = server.log_tail(10**7)
    assert "Traceback" not in log, log
    shutdown = log[log.index("SIGTERM: refusing new requests") :]
    assert " ERROR " not in shutdown and "WARNING" not in shutdown, shutdown
    assert shutdown.rstrip().endswith("rewardserve: stopped"), shutdown


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(model_repo) -> None:
    server = RewardServer(model_repo, extra_args=["--shutdown-grace-s", "60"])
    with server:
        held = HeldRequest(server)

        # a gRPC stream open across the signal: one answer before, one after
        stream_requests: list = [pb_request({"items": [{"text": "before the signal"}]})]
        more = threading.Event()

        def requests_() -> Iterator:
            yield stream_requests[0]
            more.wait(EXIT_WAIT_S)
            yield pb_request({"items": [{"text": "after the signal"}, {"text": "two"}]})

        channel = grpc.insecure_channel(server.grpc_target)
        stream = scoring_pb2_grpc.RewardServiceStub(channel).ScoreStream(requests_(), timeout=60)
        assert len(next(stream).results) == 1

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: rest_refuses_new_connections(server), "REST listener closed")
        wait_until(lambda: grpc_refuses_new_calls(server), "gRPC refuses new calls")
        assert server.proc.poll() is None, "exited before its in-flight requests finished"

        more.set()
        assert len(next(stream).results) == 2
        held.finish()
        r = held.response
        assert r is not None, held.error
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == [0, 1]
        with pytest.raises(StopIteration):
            next(stream)
        channel.close()

        assert exit_code(server) == 0
        assert_clean_log(server)


def test_sigterm_cancels_what_outlives_the_grace_and_still_exits_0(model_repo) -> None:
    server = RewardServer(model_repo, extra_args=["--shutdown-grace-s", "1"])
    with server:
        held = HeldRequest(server)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        code = exit_code(server)  # does not wait for the held request
        held.finish()
        assert code == 0
        # cancelled at the end of the grace: answered 503, or its connection closed
        if held.response is not None:
            assert held.response.status_code == 503, held.response.text
            assert held.response.json()["error"]["code"] == "unavailable"
        log = server.log_tail(10**7)
        assert "Traceback" not in log, log
        assert "timeout graceful shutdown exceeded" in log
        assert "stopped" in log
