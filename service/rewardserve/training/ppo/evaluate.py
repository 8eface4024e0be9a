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


@torch.no_grad()
def sequence_kl(
    lm: torch.nn.Module,
    reference_lm: torch.nn.Module,
    queries: Sequence[list[int]],
    responses: Sequence[list[int]],
    *,
    pad_id: int,
    device: torch.device,
    temperature: float,
    chunk: int,
) -> list[float]:
    """Each response's summed per-token log p - log p_ref (k1): for responses sampled from
    `lm`, their mean estimates KL(lm || reference) per sequence, without bias."""
    batch = make_batch(list(queries), list(responses), pad_id, device)
    logp = sequence_logprobs(lm, batch, temperature, chunk)
    ref = sequence_logprobs(reference_lm, batch, temperature, chunk)
    return ((logp - ref) * batch.mask).sum(1).tolist()  # type: ignore[no-any-return]


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
    texts: dict[str, list[str]] = {}
    rewards: dict[str, list[float]] = {}
    for label, backend in (("trained", trained), ("initial", initial)):
        responses = backend.generate(list(queries), 1, max_new_tokens, temperature, seed)
        texts[label] = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards[label] = reward.score(prompts, texts[label])
        out[label] = {"reward": mean_and_stderr(rewards[label])}
        out[label]["response_length"] = sum(map(len, responses)) / len(responses)
        if label == "trained":
            kl = sequence_kl(
                trained_lm, reference_lm, queries, responses,
                pad_id=pad_id, device=device, temperature=temperature, chunk=chunk,
            )  # fmt: skip
            out["kl_to_reference"] = mean_and_stderr(kl)
    # Both policies answered the same prompts: the paired difference has a much smaller
    # standard error than the two means' separate ones.
    diff = [a - b for a, b in zip(rewards["trained"], rewards["initial"], strict=True)]
    out["reward_gain"] = mean_and_stderr(diff)
    out["samples"] = [
        {
            "prompt": p.model_dump(exclude_none=True),
            "initial": {"response": texts["initial"][i], "reward": rewards["initial"][i]},
            "trained": {"response": texts["trained"][i], "reward": rewards["trained"][i]},
        }
        for i, p in enumerate(prompts[:8])
    ]
    return out
