"""Fakes of the service's side of the worker protocol, for testing the worker before (and
apart from) the jobs manager: they answer only what a worker asks (GET /v1/jobs/{id}, POST
/v1/jobs/{id}/report) and record what it reports. Rewards still come from a real service."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rewardserve.schemas.jobs import WorkerReport


class RecordingReporter:
    """In place of jobs.reporter.JobReporter: every report validated as the service would
    validate it, then kept. `refuse(kind)` -> raise the exception it returns, if any."""

    def __init__(self, attempt: int = 1, refuse: Callable[[str], Exception | None] | None = None):
        self.attempt = attempt
        self.reports: list[WorkerReport] = []
        self.refuse = refuse

    def report(self, kind: str, **fields: Any) -> None:
        if self.refuse is not None and (err := self.refuse(kind)) is not None:
            raise err
        body = json.loads(json.dumps({"attempt": self.attempt, "kind": kind, **fields}))
        self.reports.append(WorkerReport.model_validate(body))

    def kinds(self) -> list[str]:
        return [r.kind for r in self.reports]


class FakeJobsAPI:
    """A thread serving one job's GET and recording its POSTed reports. `answers`: status codes
    to answer the next requests with (then 200); a report arriving fires `on_report`."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.reports: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.requests = 0
        self.on_report: Callable[[dict[str, Any]], None] | None = None
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: Any) -> int:
                with api.lock:
                    api.requests += 1
                    status = api.answers.pop(0) if api.answers else 200
                payload = json.dumps(body if status == 200 else {"error": {"message": "no"}})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())
                return status

            def do_GET(self) -> None:
                self._answer(api.job)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth"] = self.headers.get("Authorization")
                if self._answer({}) == 200:
                    with api.lock:
                        api.reports.append(body)
                    if api.on_report is not None:
                        api.on_report(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJobsAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
