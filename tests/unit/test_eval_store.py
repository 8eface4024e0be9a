"""The evaluation store: the newest evaluation is the latest, a damaged one reads as none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from rewardserve.evaluation.report import ScoredPair, build_evaluation
from rewardserve.evaluation.store import EvaluationStore
from rewardserve.schemas.evaluation import Dataset, Evaluation, EvaluationSummary
from rewardserve.training.reward.data import PreferencePair

PAIR = PreferencePair("\n\nHuman: q\n\nAssistant: yes", "\n\nHuman: q\n\nAssistant: no")


def evaluation(when: datetime, margin: float) -> Evaluation:
    return build_evaluation(
        "rm", Dataset(name="d.jsonl", path="/d.jsonl", sha256="0" * 64),
        [PAIR, PAIR], [ScoredPair(margin, 0.0), ScoredPair(1.0, 0.0)],
        evaluated_at=when, seconds=0.0,
    )  # fmt: skip


def test_latest_is_the_newest_and_summarised(tmp_path: Path) -> None:
    store = EvaluationStore(tmp_path)
    assert store.latest("rm") is None and store.summary("rm") is None
    t = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    new, old = evaluation(t, -1.0), evaluation(t - timedelta(days=1), 1.0)
    path = store.record(new)
    store.record(old)  # recorded later, evaluated earlier: not the latest
    assert path == tmp_path / "evals" / "rm" / "20250102T030405.000000Z.json"
    assert path.with_suffix(".png").is_file()
    assert store.latest("rm") == new
    s = store.summary("rm")
    assert s == EvaluationSummary.of(new)
    assert (s.accuracy, s.pairs, s.data) == (0.5, 2, "d.jsonl")


def test_damaged_file_and_odd_names_read_as_never_evaluated(tmp_path: Path) -> None:
    store = EvaluationStore(tmp_path)
    path = store.record(evaluation(datetime.now(UTC), 1.0))
    path.write_text("{not json")
    assert store.latest("rm") is None
    assert store.latest("../etc") is None and store.latest("") is None


def test_the_python_client_reads_the_evaluation_listmodels_sends() -> None:
    from rewardserve.client._common import models_response
    from rewardserve.grpc.convert import model_info
    from rewardserve.schemas.models import ModelInfo
    from rewardserve.v1 import scoring_pb2 as pb

    summary = EvaluationSummary.of(evaluation(datetime(2025, 1, 2, tzinfo=UTC), 0.3))
    info = ModelInfo(id="rm", kind="reward", status="loaded", max_length=8, evaluation=summary)
    bare = info.model_copy(update={"evaluation": None})
    resp = pb.ListModelsResponse(models=[model_info(info), model_info(bare)])
    assert models_response(resp) == [info, bare]
