"""The worker's REST client: it reads its job and reports progress through the service's own
API (GET /v1/jobs/{id}, POST /v1/jobs/{id}/report), so the same worker runs on a Ray node.

Connection failures and 5xx are retried with backoff for up to `retry_s` (the service may be
restarting: a restarted service adopts the job again); a 409 means another attempt owns the
job now, and raises Superseded: the worker must exit 0 at once.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import httpx

from rewardserve.schemas.jobs import WorkerReport

log = logging.getLogger(__name__)

RETRY_S = 60.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0


class Superseded(Exception):
    """The service refused a report with 409: this attempt is no longer the job's."""


class ReportError(RuntimeError):
    """The service refused a request for good (4xx other than 409), or stayed unreachable."""


def json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged loss) as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JobReporter:
    def __init__(
        self,
        rest_url: str,
        job_id: str,
        attempt: int,
        api_key: str | None = None,
        *,
        retry_s: float = RETRY_S,
        timeout_s: float = 30.0,
    ) -> None:
        self.job_id, self.attempt, self.retry_s = job_id, attempt, retry_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env off: a proxy from the worker's environment must not reroute its reports
        self.http = httpx.Client(
            base_url=rest_url.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False
        )

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_s
        backoff = FIRST_BACKOFF_S
        while True:
            try:
                r = self.http.request(method, path, json=body)
                if r.status_code < 400:
                    return r.json() if r.content else None
                if r.status_code == 409:
                    raise Superseded(f"{method} {path}: {_detail(r)}")
                if r.status_code < 500 and r.status_code != 429:
                    raise ReportError(f"{method} {path}: HTTP {r.status_code}: {_detail(r)}")
                why = f"HTTP {r.status_code}: {_detail(r)}"
            except httpx.TransportError as e:
                why = f"{type(e).__name__}: {e}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReportError(f"{method} {path}: no answer within {self.retry_s:.0f} s ({why})")
            log.warning("%s %s failed (%s); retrying in %.1f s", method, path, why, backoff)
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def get_job(self) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} gives it: type, validated config, step..."""
        return self._request("GET", f"/v1/jobs/{self.job_id}")

    def report(self, kind: str, **fields: Any) -> None:
        """POST a WorkerReport of this attempt (validated here, so a bad report is a bug in
        the worker, not a 422 from the service)."""
        report = WorkerReport.model_validate(
            {"attempt": self.attempt, "kind": kind, **json_safe(fields)}
        )
        body = report.model_dump(mode="json", exclude_none=True)
        self._request("POST", f"/v1/jobs/{self.job_id}/report", body)

    def close(self) -> None:
        self.http.close()


def _detail(r: httpx.Response) -> str:
    try:
        error = r.json().get("error") or {}
        return str(error.get("message") or r.text[:200])
    except (ValueError, AttributeError):
        return r.text[:200]
