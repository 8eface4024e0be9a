"""The jobs' durable state: one SQLite file (WAL journal), written only by the service process.

Every change is one transaction (a status change and its event commit together), so a
service killed at any moment leaves whole rows: the job as it was before the change or
after it, never half of it. synchronous=NORMAL in WAL mode survives the process being
killed with nothing lost; an operating-system crash may roll back the newest commits, but
never leaves the file inconsistent, and it keeps an fsync off every step report.

Calls are short (one small transaction each) and are made from the event loop; one
connection, guarded by a lock, serves every thread that might call in.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.jobs import Checkpoint, Job, JobEvent, JobList, Resources

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    ended_at TEXT,
    config TEXT NOT NULL,
    resources TEXT NOT NULL,
    total_steps INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    runner_ref TEXT,
    metrics TEXT,
    result TEXT,
    error TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created_at TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""

_JSON_FIELDS = frozenset({"config", "resources", "metrics", "result"})
_TIME_FIELDS = frozenset({"created_at", "started_at", "ended_at"})
UPDATABLE = frozenset(
    {
        "status",
        "started_at",
        "ended_at",
        "config",
        "total_steps",
        "step",
        "attempt",
        "restarts",
        "resume",
        "runner_ref",
        "metrics",
        "result",
        "error",
    }
)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobRecord:
    """A stored job: what clients see plus what only the manager needs."""

    job: Job
    runner_ref: str | None
    """The current (or last) attempt's worker, as the runner named it."""
    resume: bool
    """The next attempt passes --resume (continue from the newest checkpoint)."""
    request_hash: str | None


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _encode(name: str, value: Any) -> Any:
    if name in _JSON_FIELDS:
        if isinstance(value, Resources):
            value = value.model_dump()
        return _dump(value)
    if name in _TIME_FIELDS:
        return None if value is None else value.isoformat()
    if name == "resume":
        return int(bool(value))
    return value


def encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": seq}).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        seq = json.loads(raw)["before"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidArgument("page_token is not one this service returned", field="page_token")
    return seq


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE), so each
        # method's writes commit together or not at all.
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as db:  # executescript would commit first: run them one by one
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    # ---- rows -> schemas ------------------------------------------------------------------

    def _record(self, db: sqlite3.Connection, row: sqlite3.Row) -> JobRecord:
        checkpoints = [
            Checkpoint(step=c["step"], path=c["path"])
            for c in db.execute(
                "SELECT step, path FROM checkpoints WHERE job_id = ? ORDER BY step", (row["id"],)
            )
        ]
        job = Job(
            id=row["id"],
            type=row["type"],
            status=row["status"],
            created_at=datetime.fromisoformat(row["created_at"]),
            started_at=row["started_at"] and datetime.fromisoformat(row["started_at"]),
            ended_at=row["ended_at"] and datetime.fromisoformat(row["ended_at"]),
            config=json.loads(row["config"]),
            resources=Resources.model_validate_json(row["resources"]),
            step=row["step"],
            total_steps=row["total_steps"],
            attempt=row["attempt"],
            restarts=row["restarts"],
            metrics=row["metrics"] and json.loads(row["metrics"]),
            checkpoints=checkpoints,
            result=row["result"] and json.loads(row["result"]),
            error=row["error"],
            idempotency_key=row["idempotency_key"],
        )
        return JobRecord(job, row["runner_ref"], bool(row["resume"]), row["request_hash"])

    @staticmethod
    def _event(row: sqlite3.Row) -> JobEvent:
        return JobEvent(
            id=row["id"],
            job_id=row["job_id"],
            type=row["type"],
            created_at=datetime.fromisoformat(row["created_at"]),
            data=json.loads(row["data"]),
        )

    def _get(self, db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(db, row)

    @staticmethod
    def _append(db: sqlite3.Connection, job_id: str, type_: str, data: dict[str, Any]) -> JobEvent:
        created = now()
        cur = db.execute(
            "INSERT INTO events (job_id, type, created_at, data) VALUES (?, ?, ?, ?)",
            (job_id, type_, created.isoformat(), _dump(data)),
        )
        assert cur.lastrowid is not None
        return JobEvent(id=cur.lastrowid, job_id=job_id, type=type_, created_at=created, data=data)

    # ---- jobs ------------------------------------------------------------------------------

    def insert(
        self, job: Job, *, request_hash: str | None = None, resume: bool = False
    ) -> tuple[JobRecord, JobEvent | None, bool]:
        """Store a new job and its first status event, unless its idempotency key is taken:
        then (the job holding the key, None, False). Checked and inserted in one transaction,
        so two submissions racing on a key cannot both insert."""
        with self._tx() as db:
            if job.idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                ).fetchone()
                if row is not None:
                    return self._record(db, row), None, False
            fields = {
                "id": job.id,
                "type": job.type,
                "status": job.status,
                "created_at": job.created_at,
                "started_at": job.started_at,
                "ended_at": job.ended_at,
                "config": job.config,
                "resources": job.resources,
                "total_steps": job.total_steps,
                "step": job.step,
                "attempt": job.attempt,
                "restarts": job.restarts,
                "resume": resume,
                "metrics": job.metrics,
                "result": job.result,
                "error": job.error,
                "idempotency_key": job.idempotency_key,
                "request_hash": request_hash,
            }
            cols = ", ".join(fields)
            marks = ", ".join("?" for _ in fields)
            db.execute(
                f"INSERT INTO jobs ({cols}) VALUES ({marks})",
                [_encode(k, v) for k, v in fields.items()],
            )
            event = self._append(db, job.id, "status", {"status": job.status})
            record = self._get(db, job.id)
            assert record is not None
            return record, event, True

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as db:
            return self._get(db, job_id)

    def get_by_key(self, idempotency_key: str) -> JobRecord | None:
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return None if row is None else self._record(db, row)

    def update(
        self,
        job_id: str,
        fields: dict[str, Any],
        events: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> tuple[JobRecord, list[JobEvent]]:
        """Change fields of a job and append events, in one transaction."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        with self._tx() as db:
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                values = [_encode(k, v) for k, v in fields.items()]
                cur = db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job_id))
                if cur.rowcount != 1:
                    raise KeyError(job_id)
            appended = [self._append(db, job_id, t, d) for t, d in events]
            record = self._get(db, job_id)
            if record is None:
                raise KeyError(job_id)
            return record, appended

    def by_status(self, statuses: Sequence[str]) -> list[JobRecord]:
        """Jobs in these statuses, oldest first (the queue's order)."""
        marks = ", ".join("?" for _ in statuses)
        with self._read() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", tuple(statuses)
            ).fetchall()
            return [self._record(db, r) for r in rows]

    def count(self, status: str) -> int:
        with self._read() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def list(
        self,
        *,
        status: Sequence[str] | None = None,
        type: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> JobList:
        """Newest first, `limit` a page; the token carries where the page ended (keyset
        pagination: jobs created meanwhile neither repeat nor shift a page)."""
        where, args = [], []
        if status:
            where.append(f"status IN ({', '.join('?' for _ in status)})")
            args.extend(status)
        if type is not None:
            where.append("type = ?")
            args.append(type)
        if page_token is not None:
            where.append("seq < ?")
            args.append(decode_page_token(page_token))
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._read() as db:
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
            page = [self._record(db, r).job for r in rows[:limit]]
            token = encode_page_token(rows[limit - 1]["seq"]) if len(rows) > limit else None
            return JobList(data=page, next_page_token=token)

    # ---- events ----------------------------------------------------------------------------

    def append_event(self, job_id: str, type_: str, data: dict[str, Any]) -> JobEvent:
        with self._tx() as db:
            return self._append(db, job_id, type_, data)

    def events_after(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
            return [self._event(r) for r in rows]

    # ---- metrics and checkpoints -------------------------------------------------------------

    def record_step(
        self,
        job_id: str,
        step: int,
        metrics: dict[str, Any],
        samples: list[dict[str, Any]],
    ) -> tuple[JobRecord, JobEvent]:
        """One step's report: its metrics row (replacing the row of a step a resumed run
        redoes, and dropping the rows and checkpoints after it, which that run redoes too:
        a step at or below the stored ones means the worker went back to a checkpoint),
        the job's latest step and metrics, and a step event, in one transaction."""
        with self._tx() as db:
            db.execute("DELETE FROM metrics WHERE job_id = ? AND step >= ?", (job_id, step))
            # A checkpoint of this very step may already be reported (workers may report it
            # before the step): only later ones are stale.
            db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step > ?", (job_id, step))
            db.execute(
                "INSERT INTO metrics (job_id, step, data) VALUES (?, ?, ?)",
                (job_id, step, _dump(metrics)),
            )
            db.execute(
                "UPDATE jobs SET step = ?, metrics = ? WHERE id = ?",
                (step, _dump(metrics), job_id),
            )
            event = self._append(
                db, job_id, "step", {"step": step, "metrics": metrics, "samples": samples}
            )
            record = self._get(db, job_id)
            assert record is not None
            return record, event

    def put_metrics(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO metrics (job_id, step, data) VALUES (?, ?, ?) "
                "ON CONFLICT (job_id, step) DO UPDATE SET data = excluded.data",
                (job_id, step, _dump(metrics)),
            )

    def drop_after(self, job_id: str, step: int) -> None:
        """Forget the metrics and checkpoints of steps after `step`."""
        with self._tx() as db:
            db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", (job_id, step))
            db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step > ?", (job_id, step))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every stored step's metrics in step order, each with its `step`."""
        with self._read() as db:
            rows = db.execute(
                "SELECT step, data FROM metrics WHERE job_id = ? ORDER BY step", (job_id,)
            ).fetchall()
            return [{**json.loads(r["data"]), "step": r["step"]} for r in rows]

    def record_checkpoint(
        self, job_id: str, step: int, path: str, keep: int | None = None
    ) -> tuple[JobRecord, JobEvent]:
        """Record a saved checkpoint; with `keep`, forget all but the newest `keep`, as the
        trainer deletes their folders when it saves (so the job never lists a gone one)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints (job_id, step, path) VALUES (?, ?, ?) "
                "ON CONFLICT (job_id, step) DO UPDATE SET path = excluded.path",
                (job_id, step, path),
            )
            if keep is not None:
                db.execute(
                    "DELETE FROM checkpoints WHERE job_id = ? AND step NOT IN "
                    "(SELECT step FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT ?)",
                    (job_id, job_id, keep),
                )
            event = self._append(db, job_id, "checkpoint", {"step": step, "path": path})
            record = self._get(db, job_id)
            assert record is not None
            return record, event
