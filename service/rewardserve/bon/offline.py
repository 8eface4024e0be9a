"""Best-of-N over a file of prompts, in process: rejection-sampling data for fine-tuning.

Input: JSON lines, each {"prompt": str} or {"messages": [...]} (other keys, such as an "id",
are carried through). Output: one JSON line per prompt with the prompt, the chosen
candidate, its reward and every candidate's score, written as each batch finishes so a long
run keeps what it has done. Every input line is checked before any model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from rewardserve.schemas.bon import BestOfNRequest, PromptInput
from rewardserve.schemas.errors import field_path

if TYPE_CHECKING:  # the service itself comes from the caller (rewardserve.cli)
    from rewardserve.bon.service import BestOfN


class InputError(ValueError):
    """A bad input line; the message names the line and the field."""


def read_prompts(path: Path) -> list[tuple[dict[str, Any], PromptInput]]:
    out = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {number} of {path}: not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise InputError(f"line {number} of {path}: not a JSON object")
            form = {k: raw[k] for k in ("prompt", "messages", "label") if k in raw}
            try:
                out.append((raw, PromptInput.model_validate(form)))
            except ValidationError as e:
                first = e.errors()[0]
                where = field_path(first["loc"]) or "prompt/messages"
                raise InputError(
                    f"line {number}, field '{where}': {first['msg']} ({path})"
                ) from None
    if not out:
        raise InputError(f"{path}: no prompts")
    return out


async def best_of_n_file(
    bon: BestOfN,
    prompts: list[tuple[dict[str, Any], PromptInput]],
    out_path: Path,
    request: dict[str, Any],
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, float]:
    """Run `request` (BestOfNRequest fields without prompts) over every prompt, `batch_size`
    prompts per call, on a started service (the CLI builds and closes it). Returns summary
    statistics."""
    chosen_rewards: list[float] = []
    tokens = 0
    with out_path.open("w") as out:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            fields = dict(request) | {"return_all": True}  # every score goes in the file
            if fields.get("seed") is not None:
                fields["seed"] = fields["seed"] + start  # each batch its own draws
            req = BestOfNRequest.model_validate(
                fields | {"prompts": [p.model_dump(exclude_none=True) for _, p in batch]}
            )
            resp = await bon.run(req)
            tokens += resp.usage.generated_tokens
            for (raw, _), res in zip(batch, resp.results, strict=True):
                by_index = sorted(res.candidates, key=lambda c: c.index)
                record = raw | {
                    "chosen": res.chosen.text,
                    "reward": res.chosen.reward,
                    "normalized_reward": res.chosen.normalized_reward,
                    "scores": [c.reward for c in by_index],
                    "candidates": [c.text for c in by_index],
                    # ensembles: the chosen one's member spread (single models: absent)
                    **(
                        {"uncertainty": res.chosen.uncertainty}
                        if res.chosen.uncertainty is not None
                        else {}
                    ),
                    "policy": resp.policy,
                    "reward_model": resp.reward_model,
                }
                out.write(json.dumps(record) + "\n")
                chosen_rewards.append(res.chosen.reward)
            out.flush()
            on_batch(len(batch))
    return {
        "prompts": len(chosen_rewards),
        "mean_chosen_reward": sum(chosen_rewards) / len(chosen_rewards),
        "generated_tokens": tokens,
    }
