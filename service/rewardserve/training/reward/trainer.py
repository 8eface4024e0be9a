"""Bradley-Terry reward-model training.

A backbone with a one-output head is trained so that r(chosen) - r(rejected) is large:
loss = -log sigmoid(r_chosen - r_rejected - margin), optionally plus a term that keeps the
rewards centred. Texts are tokenized with the service's own encoder (left truncation, the
same special tokens), so the model is trained on exactly what it will be given when serving.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.engine.inputs import Encoded, encode_texts
from rewardserve.modeling import ensure_pad_token, pad_token_id, right_pad, sequence_rewards
from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.data import PreferencePair, load_pairs, split_pairs

log = logging.getLogger(__name__)

# on_step(step, total_steps, metrics): after each optimiser step. metrics: loss (the step's),
# running_accuracy and running_loss (the epoch's so far), lr, epoch; the last step of an epoch
# also carries the held-out eval_accuracy when it is measured.
RewardStepHook = Callable[[int, int, dict[str, Any]], None]


def optimiser_steps(train_pairs: int, batch_size: int, epochs: int) -> int:
    """The optimiser steps of a run: every epoch's batches, the last one possibly short."""
    return math.ceil(train_pairs / batch_size) * epochs


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the pairs.

    With a coefficient, coefficient x mean((r_chosen + r_rejected)^2) is added: the pairwise
    loss only sees differences, so without it the rewards may drift to any offset.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, bucket_batches: int, rng: random.Random
) -> list[list[int]]:
    """Index batches in which items of similar length travel together.

    Sorting the whole set would give the same batches every epoch; instead the shuffled items
    are cut into windows of `bucket_batches` batches, each window is sorted by length and cut
    into batches, and the batches are shuffled. On CPU a padded token costs as much as a real
    one, so this saves most of the padding while keeping the batches random.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _rewards(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    # The service's own padding and pooling (rewardserve.modeling): trained as it is served.
    ids, mask = right_pad(seqs, pad_id)
    return sequence_rewards(model, ids, mask)


@torch.inference_mode()
def score_encoded(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    on_batch: Any = None,
) -> torch.Tensor:
    """Rewards of encoded texts in the order given, computed in length-sorted batches."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = _rewards(model, [encoded[i].input_ids for i in idx], pad_id)
        if on_batch is not None:
            on_batch(len(idx))
    model.train(was_training)
    return out


def _transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's stack of transformer blocks: the ModuleList as long as its layer count."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def freeze_lower(model: torch.nn.Module, trainable_layers: int | None, embeddings: bool) -> None:
    """Fix all but the top `trainable_layers` blocks and the embeddings below them.

    With `trainable_layers` None only the embeddings are fixed, and only if `embeddings`.
    The embeddings are every parameter registered before the first block, which holds for
    encoder and decoder models alike (word/position embeddings, embedding LayerNorm).
    """
    if trainable_layers is None and not embeddings:
        return
    blocks = _transformer_blocks(model)
    first_block = {id(p) for p in blocks[0].parameters()}
    frozen: set[int] = set()
    for p in model.parameters():
        if id(p) in first_block:
            break
        frozen.add(id(p))
    if trainable_layers is not None:
        for block in blocks[: max(0, len(blocks) - trainable_layers)]:
            frozen.update(id(p) for p in block.parameters())
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and LayerNorm gains are 1-D; decaying them towards zero only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def linear_schedule(warmup_steps: int, total_steps: int, shape: str = "linear") -> Any:
    """LR factor for update `step` (0-based): linear warm-up to 1, then `shape`: linear decay,
    cosine decay (half a cosine, as TRL's and HF's "cosine"), or constant.

    Never 0 on an update: the first warm-up step and the last decay step still move weights.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        left = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        if shape == "constant":
            return 1.0
        if shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * left))
        return left

    return factor


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    return float((r_chosen > r_rejected).float().mean()) if len(r_chosen) else math.nan


def check_output(output: Path) -> None:
    # Fail before training, not after ten minutes of it.
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK):
        raise PermissionError(f"cannot write to {output.parent}")


def replace_folder(tmp: Path, output: Path) -> None:
    """Move the finished `tmp` folder to `output`, replacing any previous model there.

    A rename is atomic, so `output` always holds either the old model, nothing (only if
    killed between the two renames) or the complete new one, never a half-written folder.
    """
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        if old.exists():
            shutil.rmtree(old)
        output.rename(old)
    tmp.rename(output)
    if old.exists():
        shutil.rmtree(old)


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int
) -> tuple[list[Encoded], list[Encoded]]:
    chosen = encode_texts(tokenizer, [p.chosen for p in pairs], max_length)
    rejected = encode_texts(tokenizer, [p.rejected for p in pairs], max_length)
    return chosen, rejected


def _load_backbone(cfg: RewardTrainingConfig, seed: int) -> tuple[Any, torch.nn.Module, int]:
    """(tokenizer set up as the service sets it, model with a fresh 1-output head, the
    tokenizer's own model_max_length to restore before saving)."""
    torch.manual_seed(seed)  # the new head's initialisation
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    saved_max_length = tokenizer.model_max_length
    tokenizer.truncation_side = "left"  # keep the end of the conversation: the replies
    tokenizer.model_max_length = 10**9  # encode_texts truncates; silence length warnings
    ensure_pad_token(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.base_model, num_labels=1, dtype=torch.float32
    )
    # Saved with the model: transformers refuses a batch without a pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    freeze_lower(model, cfg.trainable_layers, cfg.freeze_embeddings)
    return tokenizer, model, saved_max_length


@dataclass
class Fitted:
    """A model trained on some pairs, with what was measured on its held-out pairs."""

    model: torch.nn.Module
    tokenizer: Any
    saved_max_length: int
    pad_id: int
    train_chosen: list[Encoded]
    train_rejected: list[Encoded]
    eval_chosen_rewards: torch.Tensor
    """Rewards of the held-out pairs' chosen sides, in the order given (empty: none)."""
    eval_rejected_rewards: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)
    """eval_accuracy, eval_loss, eval_pairs, train_pairs, truncated_share, steps,
    epoch_log and train_seconds."""

    def score(self, chosen: list[Encoded], rejected: list[Encoded], batch_size: int,
              bar: Progress, label: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Rewards of encoded pairs (chosen, rejected) with a progress task while it runs."""
        task = bar.add_task(label, total=len(chosen) + len(rejected), stats="")
        rewards = score_encoded(
            self.model,
            [*chosen, *rejected],
            self.pad_id,
            batch_size,
            on_batch=lambda n: bar.advance(task, n),
        )
        bar.remove_task(task)
        return rewards[: len(chosen)], rewards[len(chosen) :]


def fit(
    cfg: RewardTrainingConfig,
    train_pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair],
    bar: Progress,
    *,
    seed: int | None = None,
    label: str = "",
    on_step: RewardStepHook | None = None,
) -> Fitted:
    """Train a fresh head on `cfg.base_model` over `train_pairs` and score `eval_pairs`.

    `seed` (default cfg.seed) sets the head's initialisation and the batch order, so ensemble
    members can differ in both while sharing the split. `label` prefixes the progress tasks
    (e.g. "fold 2/5"). Threads: the caller's (see torch_threads).
    """
    seed = cfg.seed if seed is None else seed
    prefix = f"{label} " if label else ""
    tokenizer, model, saved_max_length = _load_backbone(cfg, seed)
    pad_id = pad_token_id(tokenizer)

    train_c, train_r = _encode_pairs(tokenizer, train_pairs, cfg.max_length)
    eval_c, eval_r = _encode_pairs(tokenizer, eval_pairs, cfg.max_length)
    every = [*train_c, *train_r, *eval_c, *eval_r]
    truncated_share = sum(e.truncated for e in every) / len(every)
    pair_lengths = [max(len(c), len(r)) for c, r in zip(train_c, train_r, strict=True)]

    rng = random.Random(seed)
    total_steps = optimiser_steps(len(train_pairs), cfg.batch_size, cfg.epochs)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(warmup_steps, total_steps, cfg.lr_schedule)
    )
    fitted = Fitted(
        model, tokenizer, saved_max_length, pad_id, train_c, train_r, torch.empty(0),
        torch.empty(0),
    )  # fmt: skip

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        return fitted.score(eval_c, eval_r, cfg.eval_batch_size, bar, f"{prefix}held-out")

    epoch_log: list[dict[str, Any]] = []
    step = 0
    # the last step of an epoch is reported once its held-out accuracy is known
    held_back: dict[str, Any] | None = None

    def report_step(metrics: dict[str, Any]) -> None:
        if on_step is not None:
            on_step(metrics["step"], total_steps, metrics)

    train_started = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        batches = bucketed_batches(pair_lengths, cfg.batch_size, cfg.bucket_batches, rng)
        task = bar.add_task(f"{prefix}epoch {epoch}/{cfg.epochs}", total=len(batches), stats="")
        loss_sum, correct, seen = 0.0, 0, 0
        for n_batch, batch in enumerate(batches, start=1):
            seqs = [train_c[i].input_ids for i in batch]
            seqs += [train_r[i].input_ids for i in batch]
            rewards = _rewards(model, seqs, pad_id)
            r_c, r_r = rewards[: len(batch)], rewards[len(batch) :]
            loss = bradley_terry_loss(r_c, r_r, cfg.margin, cfg.center_rewards_coefficient)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()

            loss_sum += float(loss.detach()) * len(batch)
            correct += int((r_c > r_r).sum())
            seen += len(batch)
            bar.update(
                task, advance=1, stats=f"loss {loss_sum / seen:.4f}  acc {correct / seen:.3f}"
            )
            step += 1
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": float(loss.detach()),
                "running_loss": loss_sum / seen,
                "running_accuracy": correct / seen,
                "lr": scheduler.get_last_lr()[0],
            }
            if n_batch < len(batches):
                report_step(metrics)
            else:
                held_back = metrics
        entry: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_running_accuracy": correct / seen,
        }
        if eval_pairs and cfg.eval_each_epoch and epoch < cfg.epochs:
            e_c, e_r = evaluate()
            entry["eval_accuracy"] = _accuracy(e_c, e_r)
            assert held_back is not None
            held_back["eval_accuracy"] = entry["eval_accuracy"]
        if epoch < cfg.epochs and held_back is not None:
            report_step(held_back)
        epoch_log.append(entry)
        log.info("%sepoch %s", prefix, entry)
        if not bar.disable:
            shown = (
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
            )
            bar.console.print(prefix + ", ".join(shown))
    train_seconds = time.perf_counter() - train_started

    eval_loss = None
    eval_accuracy = None
    if eval_pairs:
        e_c, e_r = evaluate()
        fitted.eval_chosen_rewards, fitted.eval_rejected_rewards = e_c, e_r
        eval_accuracy = _accuracy(e_c, e_r)
        eval_loss = float(bradley_terry_loss(e_c, e_r))  # plain BT: comparable across runs
        epoch_log[-1]["eval_accuracy"] = eval_accuracy
    if held_back is not None:
        if eval_accuracy is not None:
            held_back["eval_accuracy"] = eval_accuracy
        report_step(held_back)
    fitted.report = {
        "eval_accuracy": eval_accuracy,
        "eval_loss": eval_loss,
        "eval_pairs": len(eval_pairs),
        "train_pairs": len(train_pairs),
        "truncated_share": truncated_share,
        "steps": total_steps,
        "epoch_log": epoch_log,
        "train_seconds": train_seconds,
    }
    return fitted


def reward_stats(rewards: torch.Tensor) -> tuple[float, float]:
    """(mean, std) the service normalises with; std 1.0 when it cannot be measured."""
    mean = float(rewards.mean())
    std = float(rewards.std()) if len(rewards) > 1 else 1.0
    if not math.isfinite(std) or std <= 0.0:
        std = 1.0
    return mean, std


def finish(cfg: RewardTrainingConfig, fitted: Fitted, bar: Progress) -> dict[str, Any]:
    """The report of a fitted model: its held-out results, the train accuracy and loss, and
    the reward mean/std it will be served with.

    Mean/std come from the held-out pairs' rewards when there are any (text the model never
    trained on, as it will see when serving), else from every training pair.
    """
    fitted_report = fitted.report
    has_eval = len(fitted.eval_chosen_rewards) > 0
    n_train = len(fitted.train_chosen)
    # The split shuffled the groups, so a prefix is a random subset.
    n_stats = min(n_train, cfg.stats_max_pairs or n_train) if has_eval else n_train
    t_c, t_r = fitted.score(
        fitted.train_chosen[:n_stats], fitted.train_rejected[:n_stats], cfg.eval_batch_size,
        bar, "train rewards",
    )  # fmt: skip
    if has_eval:
        source = torch.cat([fitted.eval_chosen_rewards, fitted.eval_rejected_rewards])
        normalization = {"source": "held_out", "pairs": len(fitted.eval_chosen_rewards)}
    else:
        source = torch.cat([t_c, t_r])
        normalization = {"source": "all_pairs", "pairs": n_stats}
    reward_mean, reward_std = reward_stats(source)
    return {
        "eval_accuracy": fitted_report["eval_accuracy"],
        "train_accuracy": _accuracy(t_c, t_r),
        "eval_loss": fitted_report["eval_loss"],
        "train_loss": float(bradley_terry_loss(t_c, t_r)),
        "eval_pairs": fitted_report["eval_pairs"],
        "train_pairs": fitted_report["train_pairs"],
        "stats_pairs": n_stats,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "normalization": normalization,
        "truncated_share": fitted_report["truncated_share"],
        "steps": fitted_report["steps"],
        "epoch_log": fitted_report["epoch_log"],
        "train_seconds": fitted_report["train_seconds"],
        "seconds": 0.0,  # set by write_model, just before the report is written
        "config": cfg.model_dump(mode="json"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A fresh folder beside `output` to write into; moved to `output` whole when the block
    ends (replace_folder), removed if it fails."""
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def write_model(output: Path, fitted: Fitted, report: dict[str, Any], started: float) -> None:
    """Model, tokenizer, mean/std in config.json and the report, written beside `output`
    and then moved into place whole."""
    fitted.tokenizer.model_max_length = fitted.saved_max_length
    with staged_folder(output) as tmp:
        fitted.model.save_pretrained(tmp)  # safetensors
        fitted.tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["mean"], config["std"] = report["reward_mean"], report["reward_std"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        report["seconds"] = time.perf_counter() - started
        write_report(tmp, report)


def train_reward_model(
    cfg: RewardTrainingConfig, progress: bool = True, on_step: RewardStepHook | None = None
) -> dict[str, Any]:
    """Train one reward model as `cfg` says, write it to `cfg.output`, return the report.
    `on_step`: called after every optimiser step (RewardStepHook). Cross-validation and
    ensembles are run_reward_training's (training/reward/run.py).

    The output folder holds the model (safetensors), its tokenizer, "mean" and "std" in
    config.json (the service normalises with them; see finish) and training_report.json,
    whose content is also returned.
    """
    if cfg.cv_folds is not None or cfg.ensemble > 1:
        raise ValueError("train_reward_model trains one model: use run_reward_training")
    started = time.perf_counter()
    output = Path(cfg.output).absolute()
    check_output(output)
    pairs = load_pairs(cfg.data)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.max_pairs)
    log.info("training on %d pairs, %d held out", len(train_pairs), len(eval_pairs))

    with torch_threads(cfg.torch_threads), make_progress(progress) as bar:
        fitted = fit(cfg, train_pairs, eval_pairs, bar, on_step=on_step)
        report = finish(cfg, fitted, bar)
    write_model(output, fitted, report, started)
    log.info(
        "reward model written to %s: eval accuracy %s, %.0f s",
        output,
        report["eval_accuracy"],
        report["seconds"],
    )
    return report
