"""Baseline (d) of bench_scoring.py: a naive remote reward model, one forward per request.

It has the shape of OpenRLHF's `serve_rm`: a FastAPI route `/get_reward` taking
`{"query": [texts]}` that pads the request's own texts together and runs the model inline, in
an `async` handler, so the forward blocks the event loop and requests are served strictly one
after another, never batched across requests. Weights, tokenizer, left truncation and
max_length are those rewardserve uses, so the only difference measured is the serving strategy.

    python benchmarks/naive_server.py --model-dir DIR --port PORT [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardQuery(BaseModel):
    query: list[str]


class RewardReply(BaseModel):
    rewards: list[float]


def build_app(model_dir: Path, max_length: int) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # rewardserve keeps the end of an over-long conversation (the response being judged);
    # the baseline must see the same tokens or its rewards would not be comparable.
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(body: RewardQuery) -> RewardReply:
        # Blocking work inside `async def` on purpose: that is the baseline's behaviour.
        enc = tokenizer(
            body.query,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            rewards = model(**enc).logits[:, 0].float().tolist()
        return RewardReply(rewards=rewards)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    app = build_app(args.model_dir, args.max_length)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
