"""One attempt of one training job, in its own process:

    python -m rewardserve.jobs.worker --job-id ID --attempt N --rest URL --grpc HOST:PORT [--resume]

The worker reaches the service only through its public API (so a Ray node runs it the same
way): it reads its job over REST (Bearer $REWARDSERVE_WORKER_API_KEY when auth is on),
reports started / step / checkpoint / succeeded / failed to POST /v1/jobs/{id}/report, and a
PPO job scores its rollouts through the service's gRPC Score, the batcher live traffic uses.

- ppo: run_ppo with the job's validated config; with --resume it continues from the newest
  checkpoint in the job's output folder. The policy is exported under the config's
  export_name (deterministic per job). A run whose result.json is already written (an
  attempt that finished but could not report) is reported, not trained again.
- reward: train_reward_model, then the model is registered in the repository under the
  config's name (<repo>/<name>/weights + model.yaml, renamed into place, job.json naming the
  job beside them). Reward jobs have no checkpoints: a restarted one trains again from the
  start, unless its export is already complete, which it then just reports.
- reward_eval: the evaluation of `rewardserve eval-rm` (rewardserve.evaluation), its pairs
  scored through the service's gRPC Score one request a step; the manager records the
  reported evaluation in the evaluation store.

Exit codes: 0 succeeded, or superseded (a report was refused with 409: another attempt owns
the job, so this one stops at once without reporting); 1 failed (reported with the
exception's type and message, the traceback in the log); 143 on SIGTERM (cancel: it exits
promptly, checkpoints stay, nothing is reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from rewardserve.jobs.reporter import JobReporter, Superseded
from rewardserve.jobs.specs import PAIRS_FILE
from rewardserve.training.ppo.config import validate_config
from rewardserve.training.ppo.remote_rewards import ServiceReward
from rewardserve.training.ppo.run import run_ppo
from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.export import export_reward_model
from rewardserve.training.reward.trainer import train_reward_model

log = logging.getLogger("rewardserve.jobs.worker")

API_KEY_ENV = "REWARDSERVE_WORKER_API_KEY"
JOB_MARKER = "job.json"
"""Beside a registered reward model's model.yaml: the job that trained it and its result."""
SIGTERM_EXIT = 128 + signal.SIGTERM
MAX_ERROR_CHARS = 20_000


class Reporter(Protocol):
    """What run_job needs of jobs.reporter.JobReporter."""

    def report(self, kind: str, **fields: Any) -> None: ...


# ---- ppo -----------------------------------------------------------------------------------


def _finished_ppo(output_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a run of this very config that already finished, its export in place."""
    path = output_dir / "result.json"
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if result.get("config") != config or not Path(result.get("export_folder", "")).is_dir():
        return None
    return result | {"result_path": str(path)}


def _ppo_result(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "policy": result["export_name"],
        "export_folder": result["export_folder"],
        "reward_model": result["reward_model"],
        "eval": result.get("eval"),
        "final_metrics": result["final_metrics"],
        "steps": result["steps"],
        "wall_time_s": result["wall_time_s"],
        "result_path": result["result_path"],
    }


def run_ppo_job(
    job: dict[str, Any], reporter: Reporter, grpc_address: str, api_key: str | None, resume: bool
) -> dict[str, Any]:
    cfg = validate_config(job["config"], remote_reward=True)
    done = _finished_ppo(cfg.output_dir, cfg.model_dump(mode="json"))
    if done is not None:
        log.info("the run already finished (%s): reporting it", done["result_path"])
        return _ppo_result(done)

    def on_step(metrics: dict[str, Any], samples: list[tuple[str, str, float]]) -> None:
        rows = [{"prompt": p, "response": r, "reward": w} for p, r, w in samples]
        reporter.report("step", step=metrics["step"], metrics=metrics, samples=rows)

    def on_checkpoint(step: int, folder: Path) -> None:
        reporter.report("checkpoint", step=step, checkpoint=str(folder))

    reward = ServiceReward(grpc_address, cfg.reward_model, api_key=api_key)
    try:
        result = run_ppo(
            cfg, reward, output_dir=cfg.output_dir, resume=resume, progress=False,
            on_step=on_step, on_checkpoint=on_checkpoint,
        )  # fmt: skip
    finally:
        reward.close()
    return _ppo_result(result)


# ---- reward --------------------------------------------------------------------------------


def _registered(root: Path, name: str, job_id: str) -> dict[str, Any] | None:
    """The result stored with <root>/<name> if this job registered it; an error if another
    model took the name since the job was submitted."""
    folder = root / name
    if not folder.exists():
        return None
    try:
        marker = json.loads((folder / JOB_MARKER).read_text())
    except (FileNotFoundError, ValueError):
        marker = {}
    if marker.get("job_id") != job_id:
        raise FileExistsError(f"the repository already has a model '{name}' ({folder})")
    return marker["result"]


def run_reward_job(job: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    c = job["config"]
    root, name = Path(c["model_repository"]), c["name"]
    done = _registered(root, name, job["id"])
    if done is not None:
        log.info("%s is already registered by this job: reporting it", name)
        return done
    output = Path(c["output"])
    data = c["data"]
    if data is None:  # inline pairs: the trainer reads a file
        data = output.parent / PAIRS_FILE
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(p) + "\n" for p in c["pairs"]))
    fields = {k: v for k, v in c.items() if k in RewardTrainingConfig.model_fields}
    cfg = RewardTrainingConfig.model_validate(fields | {"data": data, "output": output})

    def on_step(step: int, total: int, metrics: dict[str, Any]) -> None:
        reporter.report("step", step=step, metrics=metrics)

    report = train_reward_model(cfg, progress=False, on_step=on_step)
    result = {
        "model": name,
        "model_folder": str(root / name),
        **{k: v for k, v in report.items() if k not in ("config", "versions")},
    }
    export_reward_model(
        output,
        root,
        name,
        max_length=cfg.max_length,
        description=f"Bradley-Terry reward model trained by job {job['id']} on "
        f"{report['train_pairs']} pairs from {Path(cfg.base_model).name}",
        extra_files={JOB_MARKER: json.dumps({"job_id": job["id"], "result": result}, indent=2)},
    )
    return result


# ---- reward_eval ---------------------------------------------------------------------------


def run_eval_job(
    job: dict[str, Any], reporter: Reporter, grpc_address: str, api_key: str | None
) -> dict[str, Any]:
    """Score the job's pairs through the service's gRPC Score, one request a step; the
    result carries the evaluation, which the manager records as the model's latest. Nothing
    to resume: a restarted attempt scores again from the start."""
    import asyncio

    from rewardserve.client import AsyncRewardClient
    from rewardserve.evaluation.run import HeldOut, evaluate

    c = job["config"]

    def on_batch(done: int, total: int, pairs: int) -> None:
        reporter.report("step", step=done, metrics={"pairs_scored": pairs})

    async def work() -> dict[str, Any]:
        async with AsyncRewardClient(grpc_address, api_key=api_key) as client:

            async def score(texts: list[str]) -> Any:
                return (await client.score(texts, c["model"])).results

            fraction = c.get("held_out_fraction")  # absent from jobs stored before it existed
            held_out = None if fraction is None else HeldOut(fraction, c.get("split_seed", 0))
            e = await evaluate(
                c["model"], Path(c["data"]), score, max_pairs=c["max_pairs"],
                batch_items=c["batch_items"], on_batch=on_batch, held_out=held_out,
            )  # fmt: skip
        return {"model": e.model, "evaluation": e.model_dump(mode="json")}

    # the reporter blocks (httpx); a step report every request is cheap beside the forward
    return asyncio.run(work())


# ---- the attempt ---------------------------------------------------------------------------


def run_job(
    job: dict[str, Any], reporter: Reporter, grpc_address: str, api_key: str | None, resume: bool
) -> int:
    """Run `job` (as GET /v1/jobs/{id} gives it), reporting through `reporter`; the exit code."""
    try:
        reporter.report("started", total_steps=job["total_steps"])
        if job["type"] == "ppo":
            result = run_ppo_job(job, reporter, grpc_address, api_key, resume)
        elif job["type"] == "reward_eval":
            result = run_eval_job(job, reporter, grpc_address, api_key)
        else:
            result = run_reward_job(job, reporter)
        reporter.report("succeeded", result=result)
        log.info("job %s succeeded", job["id"])
        return 0
    except Superseded as e:
        log.warning("another attempt owns job %s now (%s): stopping", job["id"], e)
        return 0
    except Exception as e:
        log.error("job %s failed:\n%s", job["id"], traceback.format_exc())
        error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
        try:
            reporter.report("failed", error=error)
        except Superseded:
            return 0
        except Exception:
            log.exception("could not report the failure")
        return 1


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every finally: the reward client closes, files are flushed
    raise SystemExit(SIGTERM_EXIT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rewardserve.jobs.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--job-id", required=True)
    p.add_argument("--attempt", type=int, required=True, help="this attempt's number (from 1)")
    p.add_argument("--rest", required=True, help="the service's REST base URL")
    p.add_argument("--grpc", required=True, help="the service's gRPC address, host:port")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # one line per report would bury the trainer's own lines in worker.log
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    api_key = os.environ.get(API_KEY_ENV) or None
    reporter = JobReporter(args.rest, args.job_id, args.attempt, api_key)
    log.info("job %s attempt %d (pid %d)%s", args.job_id, args.attempt, os.getpid(),
             ", resuming" if args.resume else "")  # fmt: skip
    try:
        try:
            job = reporter.get_job()
        except Superseded:
            return 0
        except Exception:
            log.exception("cannot read job %s", args.job_id)
            return 1
        if job.get("attempt", args.attempt) > args.attempt:
            log.warning("job %s is at attempt %s, after this one (%d): stopping", args.job_id,
                        job.get("attempt"), args.attempt)  # fmt: skip
            return 0
        return run_job(job, reporter, args.grpc, api_key, args.resume)
    finally:
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
