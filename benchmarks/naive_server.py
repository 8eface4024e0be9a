"""Baseline (d): the naive remote reward model, one forward per request, no batching.

The shape of OpenRLHF's serve_rm: a FastAPI handler that runs the model on the request's
own texts, blocking the event loop while it does. Same weights, tokenizer and truncation as
rewardserve, so only the serving strategy differs.

    python benchmarks/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class Query(BaseModel):
    query: list[str]


def build(model_dir: str, max_length: int = 256) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(q: Query) -> dict[str, list[float]]:
        enc = tokenizer(
            q.query, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            rewards = model(**enc).logits[:, 0].tolist()
        return {"rewards": rewards}

    return app


if __name__ == "__main__":
    torch.set_num_threads(2)
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
