"""`rewardserve eval-rm` on a tiny reward model: the report, the store, the refusals."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import build_tiny_rm
from rewardserve.cli import app
from rewardserve.evaluation.store import EvaluationStore
from rewardserve.schemas.evaluation import Evaluation

PNG = b"\x89PNG\r\n\x1a\n"


def write_pairs(path: Path, n: int) -> Path:
    rows = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: a careful answer to {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no",
        }
        for i in range(n)
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-repo")
    build_tiny_rm(root, "tiny-rm", default=True)
    return root


def run(repo: Path, tmp: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app,
        ["eval-rm", "--model-repository", str(repo), "--cache-dir", str(tmp / "cache"),
         "--data-dir", str(tmp / "data"), "--torch-threads", "1", *args],
    )  # fmt: skip
    return result.exit_code, result.stdout, result.stderr


def test_eval_rm_writes_the_report_and_records_it(repo: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl.gz", 12)
    code, out, err = run(repo, tmp_path, "--model", "tiny-rm", "--data", str(data),
                         "--max-pairs", "10", "--batch-items", "4", "--output",
                         str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    report = Evaluation.model_validate_json((tmp_path / "out" / "evaluation.json").read_text())
    assert report.model == "tiny-rm" and report.pairs == 10
    assert report.dataset.name == "pairs.jsonl.gz"
    assert len(report.dataset.sha256) == 64
    acc = report.accuracy
    assert acc.n == 10 and acc.ci_low <= acc.value <= acc.ci_high
    assert report.length.responses == 20
    # every chosen answer here is longer than its "no"
    assert report.length.chosen_longer.n == 10 and report.length.chosen_shorter.n == 0
    assert report.ensemble is None
    assert (tmp_path / "out" / "reliability.png").read_bytes().startswith(PNG)
    assert "accuracy" in out and "tiny-rm" in out
    latest = EvaluationStore(tmp_path / "data").latest("tiny-rm")
    assert latest == report
    stored = EvaluationStore(tmp_path / "data").latest_path("tiny-rm")
    assert stored is not None and stored.with_suffix(".png").read_bytes().startswith(PNG)
    # the engine the server uses gives these rewards: scoring again gives the same figures
    code, _, err = run(repo, tmp_path, "--model", "tiny-rm", "--data", str(data),
                       "--max-pairs", "10")  # fmt: skip
    assert code == 0, err
    again = EvaluationStore(tmp_path / "data").latest("tiny-rm")
    assert again is not None and again.evaluated_at > report.evaluated_at
    assert again.accuracy == report.accuracy and again.calibration == report.calibration


def test_unknown_model_is_named(repo: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 2)
    code, _, err = run(repo, tmp_path, "--model", "no-such-rm", "--data", str(data))
    assert code == 2
    assert "--model" in err and "no-such-rm" in err
    assert not (tmp_path / "data" / "evals").exists()


@pytest.mark.parametrize("content", [None, "not json\n", '{"chosen": "a"}\n'])
def test_bad_data_file_is_a_pair_data_error(
    repo: Path, tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = run(repo, tmp_path, "--model", "tiny-rm", "--data", str(path))
    assert code == 2
    assert err.startswith("rewardserve eval-rm: --data: ") and str(path) in err


def test_held_out_fraction_scores_exactly_what_train_rm_held_out(
    repo: Path, tmp_path: Path
) -> None:
    from rewardserve.training.reward.data import load_pairs, split_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    code, _, err = run(repo, tmp_path, "--model", "tiny-rm", "--data", str(data),
                       "--held-out-fraction", "0.25", "--split-seed", "3", "--output",
                       str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    report = Evaluation.model_validate_json((tmp_path / "out" / "evaluation.json").read_text())
    _, held = split_pairs(load_pairs(data), 0.25, 3)  # what train-rm --eval-fraction 0.25 kept
    assert report.pairs == len(held) == 5
    assert report.dataset.split is not None and "--eval-fraction 0.25 --seed 3" in (
        report.dataset.split
    )
    code, _, err = run(repo, tmp_path, "--model", "tiny-rm", "--data", str(data),
                       "--held-out-fraction", "1.5")  # fmt: skip
    assert code == 2 and "held" in err.replace("_", "-").lower()
