"""Settings of one reward-model training run.

The defaults are the run that builds the service's default model (all-MiniLM-L6-v2 on the
1,850 HH-RLHF harmless-base pairs, about 3 minutes on 2 CPU cores): the recipe `make
rm-recipes` chose by grouped cross-validation (benchmarks/rm_recipes.yaml, README "The
default reward model").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RewardTrainingConfig(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    base_model: Path
    """Hugging Face model folder of the backbone; a one-output regression head is added."""

    data: Path
    """Preference pairs: a .jsonl or .jsonl.gz file, one {"chosen": ..., "rejected": ...}
    object a line, each side a whole "\\n\\nHuman: ... \\n\\nAssistant: ..." conversation."""

    output: Path
    """Folder the trained model, tokenizer and training_report.json are written to (replaced
    as a whole once training has finished)."""

    max_length: int = Field(256, ge=8)
    """Most tokens a conversation keeps; longer ones lose their beginning (left truncation),
    exactly as the service truncates at scoring time."""

    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the pairs held out to measure pairwise accuracy (0: no held-out split)."""

    seed: int = 0
    """Seed of the train/eval split, the head's initialisation and the batch order."""

    epochs: int = Field(1, ge=1)
    """Passes over the training pairs."""

    batch_size: int = Field(16, ge=1)
    """Pairs per optimiser step (each step runs 2 x batch_size sequences)."""

    learning_rate: float = Field(1e-4, gt=0.0)
    """Peak AdamW learning rate, reached after warm-up and then decayed as lr_schedule says."""

    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """After warm-up: linear decay to zero, cosine decay to zero, or constant."""

    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""

    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Share of the optimiser steps over which the learning rate rises linearly from zero."""

    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradients are clipped to this global norm (None: no clipping)."""

    margin: float = 0.0
    """Reward gap the loss asks for: loss = -log sigmoid(r_chosen - r_rejected - margin)."""

    center_rewards_coefficient: float | None = Field(None, ge=0.0)
    """If set, adds coefficient x mean((r_chosen + r_rejected)^2) to the loss, which keeps
    rewards centred on zero (as TRL's RewardTrainer)."""

    disable_dropout: bool = True
    """Train without dropout: with a regression head on a pairwise loss, dropout mostly adds
    noise to the reward differences."""

    freeze_embeddings: bool = False
    """Keep the embeddings (everything before the first transformer block) fixed."""

    trainable_layers: int | None = Field(2, ge=0)
    """Train only the top N transformer blocks, with everything after them and the head;
    the embeddings and lower blocks stay fixed. Backward then stops at the lowest trained
    block, so a step costs much less on CPU. None: train every weight."""

    bucket_batches: int = Field(16, ge=1)
    """Length bucketing: pairs are shuffled, cut into windows of this many batches, and each
    window sorted by length before it is split into batches, so a batch pads little while
    epochs still see different batches."""

    eval_each_epoch: bool = True
    """Also measure held-out accuracy after every epoch but the last (the report's learning
    curve; a few seconds each)."""

    stats_max_pairs: int | None = Field(64, ge=1)
    """Score at most this many training pairs (a random subset) for the report's train
    accuracy and loss, instead of all of them. None: all. The reward mean/std the service
    normalises with come from the held-out pairs, or from every training pair when there is
    no held-out split; never from this subset."""

    eval_batch_size: int = Field(32, ge=1)
    """Sequences per forward pass when scoring for accuracy and reward statistics."""

    torch_threads: int | None = Field(None, ge=1)
    """CPU threads torch may use (None: torch's default, one per core)."""

    max_pairs: int | None = Field(None, ge=2)
    """Use at most this many pairs (a seeded random subset); for quick runs and tests."""

    cv_folds: int | None = Field(None, ge=2)
    """K-fold cross-validation with folds grouped by conversation: K models, each trained on
    K-1 folds and scored on the fold it never saw; the report gives the pooled out-of-fold
    accuracy with a cluster-bootstrap 95 % interval. The held-out split (eval_fraction) is
    not used: every pair is held out once. None: no cross-validation. On the command line
    also `--cv K`."""

    cv_final: bool = True
    """With cv_folds: afterwards train the model that is served on all pairs, its report
    carrying the cross-validated accuracy (False: only the cross-validation report)."""

    ensemble: int = Field(1, ge=1)
    """Train this many members with different seeds (head initialisation and batch order;
    the same split), written as <output>/members/0..K-1 with <output>/ensemble.json."""

    bootstrap: bool = False
    """With ensemble > 1: each member trains on its own bootstrap resample of the training
    conversations (drawn with replacement by conversation, seeded by the member's seed), as
    in bagging, so members also differ in what they saw, not only in their seed."""

    @model_validator(mode="after")
    def _one_mode(self) -> Self:
        if self.cv_folds is not None and self.ensemble > 1:
            raise ValueError("cv_folds and ensemble > 1 cannot be combined: cross-validate "
                             "single models, then train the ensemble")  # fmt: skip
        if self.bootstrap and self.ensemble < 2:
            raise ValueError("bootstrap resamples the data of ensemble members: it needs "
                             "ensemble >= 2")  # fmt: skip
        return self
