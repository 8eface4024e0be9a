"""The one lock every model load in the process takes (reward models and policies alike).

transformers' from_pretrained leans on process-wide state (weight-init contexts, default
dtype): two loads at once in different threads corrupted each other here (a policy loaded
beside the reward model came up with uninitialised weights and wrote gibberish). It lives
in a module of its own so the policy backends and the reward-model loader share it without
importing each other.
"""

from __future__ import annotations

import threading

LOAD_LOCK = threading.Lock()
