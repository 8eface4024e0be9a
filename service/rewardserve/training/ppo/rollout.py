"""Where rollouts come from: the RolloutBackend protocol and its transformers implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from rewardserve.modeling import pad_token_id


class RolloutBackend(Protocol):
    def generate(
        self,
        queries: Sequence[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        """len(queries) * n response token-id lists, prompt-major (query i's samples at
        i*n ... i*n+n-1), each as sampled: ending with EOS (inclusive) if it stopped, else
        max_new_tokens long. Same seed and same weights give the same samples."""
        ...

    def sync_weights(self, policy: torch.nn.Module) -> float:
        """Make the backend sample from `policy`'s current weights; seconds it took."""
        ...

    def close(self) -> None: ...


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The tokens up to and including the first EOS (all of them when none)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def eos_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (chat
    models often stop on an end-of-turn token as well as EOS)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


class TransformersRollout:
    """Samples with the live training policy itself: no copy to keep in step, so
    `sync_weights` has nothing to do."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer)

    @torch.no_grad()
    def generate(
        self,
        queries: Sequence[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        longest = max(len(q) for q in queries)
        ids = torch.full((len(queries), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, q in enumerate(queries):  # left padding: every row's next token is at the end
            ids[row, longest - len(q) :] = torch.tensor(q, dtype=torch.long)
            mask[row, longest - len(q) :] = 1
        devices = [self.device] if self.device.type == "cuda" else []
        # the sample depends on `seed` alone, not on whatever drew from the global RNG before
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=True,
                temperature=temperature,
                # plain sampling at `temperature`: the distribution whose log-probs PPO uses
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                eos_token_id=sorted(self.eos_ids) or None,
                pad_token_id=self.pad_id,
            )
        return [cut_at_eos(row.tolist(), self.eos_ids) for row in out[:, longest:].cpu()]

    def sync_weights(self, policy: torch.nn.Module) -> float:
        return 0.0

    def close(self) -> None:
        pass
