"""`dtype: auto`: bfloat16 only where it is the faster precision (CUDA, CPUs with AMX)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rewardserve.registry import dtypes
from rewardserve.registry.manifest import ManifestError, load_manifest


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return p


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    flags = dtypes.cpu_flags(cpuinfo(tmp_path, "fpu avx2 fma avx512f avx512_bf16"))
    assert {"avx2", "avx512f", "avx512_bf16"} <= flags and "amx_bf16" not in flags


def test_cpu_flags_of_a_missing_file_are_empty(tmp_path: Path) -> None:
    assert dtypes.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 fma", "float32"),  # AVX2 only: bf16 emulated in software
        ("avx2 avx512f avx512bw", "float32"),  # AVX-512 without the bf16 dot product
        # AVX512-BF16 without AMX: measured slower than float32 (vLLM 132 vs 171 tokens/s)
        ("avx2 avx512f avx512_bf16", "float32"),
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "bfloat16"),
    ],
)
def test_auto_follows_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, expected: str
) -> None:
    read, path = dtypes.cpu_flags, cpuinfo(tmp_path, flags)
    monkeypatch.setattr(dtypes.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: read(path))
    dtypes.fast_bf16.cache_clear()
    try:
        assert dtypes.resolve_dtype("auto") == expected
    finally:
        dtypes.fast_bf16.cache_clear()


@pytest.mark.parametrize(("supported", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cuda_gpu_follows_its_bf16_support(
    monkeypatch: pytest.MonkeyPatch, supported: bool, expected: str
) -> None:
    monkeypatch.setattr(dtypes.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dtypes.torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"amx_bf16"}))  # GPU decides
    dtypes.fast_bf16.cache_clear()
    try:
        assert dtypes.resolve_dtype("auto") == expected
    finally:
        dtypes.fast_bf16.cache_clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_explicit_dtypes_pass_through(dtype: str) -> None:
    assert dtypes.resolve_dtype(dtype) == dtype


def manifest(tmp_path: Path, kind: str, dtype: str) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    raw = {"name": "m", "kind": kind, "source": {"kind": "cache", "path": "m"}, "dtype": dtype}
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.parametrize("kind", ["reward", "policy"])
def test_manifests_accept_auto(tmp_path: Path, kind: str) -> None:
    assert load_manifest(manifest(tmp_path, kind, "auto")).dtype == "auto"


def test_int8_policy_is_refused_at_dtype(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest(tmp_path, "policy", "int8"))
    assert info.value.field == "dtype" and "int8" in str(info.value)
