"""Padding and pooling of reward models, shared by training and serving.

The trainer and the scorer both import these, so a model is scored in serving exactly as it
was scored in training: the same pad id, right padding, and the reward read at the last
real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def ensure_pad_token(tokenizer: Any) -> None:
    """Decoder tokenizers often ship without a pad token: pad with EOS, as TRL does."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def pad_token_id(tokenizer: Any) -> int:
    """The id padding positions hold. Which id it is does not change a reward (pads are
    masked and never pooled), but it must be a valid embedding index."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each sequence at the left of its row."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def last_real(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values[b, t] at each row's last real position of a right-padded batch."""
    last = mask.sum(dim=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def token_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The per-token head of a decoder sequence-classification model (Llama, Qwen, Gemma,
    GPT-2: `score` over every position of the backbone), None for encoder models, which pool
    inside the model (BERT's [CLS]).

    transformers pools such heads at the last token that is not pad_token_id; with pad = EOS
    that skips an EOS the text really ends in (every Llama-3 chat turn ends in <|eot_id|>),
    so the reward is read from the wrong token. Applying the head ourselves lets pooling
    follow the attention mask.
    """
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Module) and getattr(model, "base_model", model) is not model:
        return head
    return None


def sequence_rewards(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    value_head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """One reward per row of a right-padded batch, as float32.

    `value_head`: a separate per-token head over `model`'s hidden states (OpenRLHF's format).
    """
    head = value_head if value_head is not None else token_head(model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    backbone = model if value_head is not None else model.base_model
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    return last_real(head(hidden)[..., 0], mask).float()
