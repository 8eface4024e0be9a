"""`rewardserve eval-rm`: one model, one file, in this process; a table on stdout, the report
recorded in the evaluation store (and --output)."""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rewardserve.config import Settings
from rewardserve.evaluation.config import EvalConfig
from rewardserve.evaluation.local import engine_scorer
from rewardserve.evaluation.run import HeldOut, batch_count, evaluate, read_pairs
from rewardserve.evaluation.store import EvaluationStore, write_report
from rewardserve.schemas.errors import ServiceError
from rewardserve.schemas.evaluation import Accuracy, Evaluation
from rewardserve.training.reward.data import PairDataError

REPORT, DIAGRAM = "evaluation.json", "reliability.png"


def _fail(message: str) -> int:
    print(f"rewardserve eval-rm: {message}", file=sys.stderr)
    return 2


def _acc(a: Accuracy) -> str:
    if a.value is None:
        return "n/a (0 pairs)"
    return f"{a.value:.3f}  [{a.ci_low:.3f}, {a.ci_high:.3f}]  n={a.n}"


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def table(e: Evaluation) -> Table:
    t = Table(title=f"{e.model} on {e.dataset.name}", show_header=False)
    t.add_row("pairs", f"{e.pairs} ({e.distinct_prompts} distinct prompts, {e.ties} ties)")
    t.add_row("accuracy [95% Wilson]", _acc(e.accuracy))
    t.add_row("ECE (10 bins, raw σ)", f"{e.calibration.ece:.3f}")
    t.add_row("log loss", f"{e.calibration.log_loss:.3f}")
    ln = e.length
    t.add_row("reward~chars pearson/spearman", f"{_r(ln.pearson_chars)} / {_r(ln.spearman_chars)}")
    t.add_row("accuracy, chosen shorter", _acc(ln.chosen_shorter))
    t.add_row("accuracy, chosen longer", _acc(ln.chosen_longer))
    if e.ensemble is not None:
        t.add_row("members", str(e.ensemble.members))
        t.add_row("accuracy, confident half", _acc(e.ensemble.confident))
        t.add_row("accuracy, uncertain half", _acc(e.ensemble.uncertain))
    t.add_row("seconds", f"{e.seconds:.1f}")
    return t


def run_eval_rm(cfg: EvalConfig) -> int:
    """The command's work; its exit code (2: a bad --model or --data, said on stderr)."""
    held_out = None
    if cfg.held_out_fraction is not None:
        held_out = HeldOut(cfg.held_out_fraction, cfg.split_seed)
    try:  # the data before any model loads
        pairs = read_pairs(cfg.data, cfg.max_pairs, held_out)
    except PairDataError as e:
        return _fail(f"--data: {e}")
    settings = Settings(
        model_repository=cfg.model_repository,
        cache_dir=cfg.cache_dir,
        data_dir=cfg.data_dir,
        torch_threads=cfg.torch_threads,
        max_items_per_request=max(cfg.batch_items, Settings().max_items_per_request),
        jobs_enabled=False,
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("pairs {task.fields[pairs]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip

    async def work() -> Evaluation:
        async with engine_scorer(settings, cfg.model) as (name, score):
            task = progress.add_task(
                f"eval {name}", total=batch_count(len(pairs), cfg.batch_items), pairs=0
            )

            def on_batch(done: int, total: int, scored: int) -> None:
                progress.update(task, completed=done, pairs=scored)

            with progress:
                return await evaluate(
                    name, cfg.data, score, batch_items=cfg.batch_items, on_batch=on_batch,
                    pairs=pairs, held_out=held_out,
                )  # fmt: skip

    try:
        e = asyncio.run(work())
    except ServiceError as err:
        where = "--model" if err.field == "model" else "scoring"
        return _fail(f"{where}: {err.message} (repository {cfg.model_repository})")
    stored = EvaluationStore(cfg.data_dir).record(e)
    if cfg.output is not None:
        write_report(e, cfg.output / REPORT, cfg.output / DIAGRAM)
    Console().print(table(e))
    print(f"recorded: {stored} (+ .png)")
    if cfg.output is not None:
        print(f"wrote: {cfg.output / REPORT}, {cfg.output / DIAGRAM}")
    return 0
