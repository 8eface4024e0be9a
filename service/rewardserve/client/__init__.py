"""rewardserve's Python client over gRPC: score, rerank, Best-of-N and the model list, with a
deadline per call, API-key auth, retries with backoff on UNAVAILABLE and on an overloaded
server (honouring its retry-after), and one exception type per error code.

    from rewardserve.client import RewardClient

    with RewardClient("127.0.0.1:50051", api_key="...") as client:
        resp = client.score([{"prompt": "\\n\\nHuman: Hi\\n\\nAssistant:", "response": "Hello!"}])
        print(resp.model, [r.reward for r in resp.results])

Results are the REST API's response models (rewardserve.schemas), so both transports read
alike. AsyncRewardClient has the same methods, awaited.
"""

from rewardserve.client._common import RetryPolicy
from rewardserve.client.client import AsyncRewardClient, RewardClient
from rewardserve.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RewardServeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "AsyncRewardClient",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "RewardClient",
    "RewardServeError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
