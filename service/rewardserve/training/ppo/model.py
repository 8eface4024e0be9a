"""The trained policy with its value head, the frozen reference, and their forward pass.

The value model is a scalar Linear on the policy backbone's last hidden state, not a separate
critic: one forward gives the logits and the values, so a PPO update costs one forward and one
backward per mini-batch instead of two of each. On a CPU, where the policy's forward and
backward are most of a step, that halves the update's cost; the price is that the value loss
shapes the shared backbone too (scaled by vf_coef, as in TRL's and OpenAI's PPO with a shared
trunk).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardserve.loading import LOAD_LOCK
from rewardserve.modeling import ensure_pad_token
from rewardserve.training.ppo.core import logprobs_from_logits


class PolicyWithValueHead(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        # small initial values: returns start near the (normalised) score scale
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(self.value_head.bias)


def load_policy(folder: Path) -> tuple[torch.nn.Module, Any]:
    """(causal LM in float32, tokenizer) from an HF folder; dropout off, as TRL does for PPO
    (dropout would make the old and new log-probs of the same weights differ)."""
    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ensure_pad_token(tokenizer)
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return lm.eval(), tokenizer


def frozen_copy(lm: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(lm).eval()
    ref.requires_grad_(False)
    return ref


@dataclass
class Precision:
    """Autocast in bf16 over float32 master weights where bf16 is the fast precision."""

    device: torch.device
    bf16: bool

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if not self.bf16:
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield


@dataclass
class Batch:
    """Queries and responses of one batch as model input: [left-padded query | right-padded
    response]; `mask` marks the real response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    context_length: int

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.position_ids[idx],
            self.responses[idx],
            self.mask[idx],
            self.context_length,
        )


def make_batch(
    queries: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device
) -> Batch:
    q_len = max(len(q) for q in queries)
    r_len = max(1, max(len(r) for r in responses))
    n = len(queries)
    ids = torch.full((n, q_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, (q, r) in enumerate(zip(queries, responses, strict=True)):
        ids[row, q_len - len(q) : q_len] = torch.tensor(q, dtype=torch.long)
        ids[row, q_len : q_len + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[row, q_len - len(q) : q_len + len(r)] = 1
    # positions as generate counts them under left padding
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    mask = attn[:, q_len:].float()
    return Batch(
        ids.to(device),
        attn.to(device),
        pos.to(device),
        ids[:, q_len:].to(device),
        mask.to(device),
        q_len,
    )


def response_logits(
    lm: torch.nn.Module, batch: Batch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits / temperature at each response position, last hidden states there). Logits are
    computed for the response positions only: the prompt's would cost B x L x vocab."""
    out = lm(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=batch.responses.shape[1] + 1,
    )
    logits = out.logits[:, :-1].float() / (temperature + 1e-7)
    hidden = out.hidden_states[-1][:, batch.context_length - 1 : -1]
    return logits, hidden


def policy_forward(
    policy: PolicyWithValueHead, batch: Batch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, log-probs of the responses, values) in one forward of the backbone."""
    logits, hidden = response_logits(policy.lm, batch, temperature)
    values = policy.value_head(hidden.to(policy.value_head.weight.dtype))[..., 0].float()
    return logits, logprobs_from_logits(logits, batch.responses), values


@torch.no_grad()
def sequence_logprobs(
    lm: torch.nn.Module, batch: Batch, temperature: float, chunk: int
) -> torch.Tensor:
    """Per-token log-probs of the responses under `lm`, `chunk` rows at a time."""
    parts = []
    for start in range(0, batch.input_ids.shape[0], chunk):
        sub = batch.rows(torch.arange(start, min(start + chunk, batch.input_ids.shape[0])))
        logits, _ = response_logits(lm, sub, temperature)
        parts.append(logprobs_from_logits(logits, sub.responses))
    return torch.cat(parts)
