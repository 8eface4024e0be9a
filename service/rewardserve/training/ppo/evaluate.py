"""The held-out evaluation: the trained policy against the initial one on prompts never
trained on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rewardserve.schemas.bon import PromptInput
from rewardserve.training.ppo.model import make_batch, sequence_logprobs
from rewardserve.training.ppo.rewards import RewardSource
from rewardserve.training.ppo.rollout import RolloutBackend


def mean_and_stderr(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "stderr": math.sqrt(var / n), "n": n}


def evaluate(
    *,
    prompts: Sequence[PromptInput],
    queries: Sequence[list[int]],
    trained: RolloutBackend,
    initial: RolloutBackend,
    trained_lm: torch.nn.Module,
    reference_lm: torch.nn.Module,
    tokenizer: Any,
    reward: RewardSource,
    pad_id: int,
    device: torch.device,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chunk: int,
) -> dict[str, Any]:
    """One seeded sample per prompt from each policy, its mean reward with the standard error,
    and KL(trained || reference): the mean over the trained policy's samples of the summed
    per-token log p - log p_ref."""
    out: dict[str, Any] = {"prompts": len(prompts), "seed": seed}
    for label, backend in (("trained", trained), ("initial", initial)):
        responses = backend.generate(list(queries), 1, max_new_tokens, temperature, seed)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        out[label] = {"reward": mean_and_stderr(reward.score(prompts, texts))}
        out[label]["response_length"] = sum(map(len, responses)) / len(responses)
        if label == "trained":
            batch = make_batch(list(queries), responses, pad_id, device)
            logp = sequence_logprobs(trained_lm, batch, temperature, chunk)
            ref = sequence_logprobs(reference_lm, batch, temperature, chunk)
            kl = ((logp - ref) * batch.mask).sum(1)
            out["kl_to_reference"] = mean_and_stderr(kl.tolist())
            out["samples"] = [
                {"prompt": p.model_dump(exclude_none=True), "response": t}
                for p, t in zip(prompts[:5], texts[:5], strict=False)
            ]
    return out
