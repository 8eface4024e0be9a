"""The `model.yaml` manifest of one hosted model, validated with pydantic."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rewardserve.rewards.spec import CompositeSpec

MANIFEST_NAME = "model.yaml"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class ManifestError(ValueError):
    """A manifest that cannot be served; the message names the file and the field."""

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        self.path, self.field = str(path), field
        super().__init__(f"{path}: field '{field}': {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where the weights are. Paths are relative and may not leave their base folder."""

    kind: Literal["repository", "cache", "package"]
    """repository: inside the model's own folder; cache: inside the model cache;
    package: inside an installed Python package."""
    path: str = "."
    package: str | None = Field(None, validate_default=True)
    """Import name of the package, for kind=package."""
    gguf_file: str | None = None
    """A GGUF file inside the folder, loaded (dequantized) through transformers."""

    @field_validator("path", "gguf_file")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        if v is not None and (Path(v).is_absolute() or ".." in Path(v).parts):
            raise ValueError(f"'{v}' must be a relative path that stays inside its base")
        return v

    @field_validator("package")
    @classmethod
    def _package_for_kind(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") == "package" and not v:
            raise ValueError("kind 'package' needs 'package'")
        return v


class Head(_Strict):
    format: Literal["sequence_classification", "openrlhf"] = "sequence_classification"
    """sequence_classification: AutoModelForSequenceClassification with num_labels=1 (TRL,
    Skywork). openrlhf: AutoModel backbone + linear value head, reward at the last non-pad
    token."""
    value_head_prefix: str = "score"
    """openrlhf only: attribute name of the value head in the checkpoint."""


class PolicySpec(_Strict):
    """How a policy (kind: policy) generates."""

    backend: Literal["auto", "vllm", "transformers", "openai"] = "auto"
    """auto: the server's --policy-backend (vLLM where it is installed, else transformers).
    openai: a remote OpenAI-compatible completions server; `source` then only holds the
    tokenizer."""
    base_url: str | None = None
    """openai only: the server's API root, e.g. http://gpu-box:8000/v1."""
    remote_model: str | None = None
    """openai only: the model name on that server."""

    @model_validator(mode="after")
    def _remote_needs_address(self) -> PolicySpec:
        if self.backend == "openai" and not (self.base_url and self.remote_model):
            raise ValueError("backend 'openai' needs base_url and remote_model")
        return self


class Ensemble(_Strict):
    """A reward model made of members (each a HF reward-model folder with its own mean/std
    in config.json), as `rewardserve train-rm --ensemble k` writes them."""

    members: list[str] = Field(min_length=2)
    """Member folders, relative to the model's source folder (e.g. members/0)."""
    combine: Literal["normalized", "raw"] = "normalized"
    """How `reward` is formed: normalized, the mean of the members' normalized rewards;
    raw, the mean of their raw rewards. `normalized_reward` is always the former."""

    @field_validator("members")
    @classmethod
    def _relative_distinct(cls, v: list[str]) -> list[str]:
        for i, rel in enumerate(v):
            if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"member {i} ('{rel}') must be a relative path inside the source")
            if Path(rel) in [Path(r) for r in v[:i]]:
                raise ValueError(f"member {i} ('{rel}') is listed twice")
        return v


class Normalization(_Strict):
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


def _check_alias(alias: str) -> str:
    if alias != alias.strip():
        raise ValueError(f"{alias!r} starts or ends with white space")
    if any(ord(c) < 32 or ord(c) == 127 for c in alias):
        raise ValueError(f"{alias!r} holds a control character")
    return alias


# Any name a client may send for the model: clients such as verl send the local path or hub id
# they load the tokenizer from, so paths and "org/name" are allowed (matched exactly).
Alias = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_check_alias)]


class ModelManifest(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["reward", "policy"]
    aliases: list[Alias] = []
    """Other names requests may use for this model (like vLLM's --served-model-name), e.g.
    the local path or hub id a training framework sends as `model`. Unique across the
    repository: no alias may be another model's name or alias."""
    composite: CompositeSpec | None = None
    """Reward models only: a composite reward of named parts (hosted reward models and rule
    rewards) with weights, and no weights of its own (rewardserve.rewards.spec)."""
    source: Source | None = Field(None, validate_default=True)
    """Required, except for a composite reward (which has no weights of its own)."""
    description: str = ""
    head: Head = Head()
    max_length: int = Field(512, ge=8, le=131072)
    """Reward models: longest input scored (longer ones are truncated). Policies: the context
    length, prompt plus generated tokens."""
    truncation_side: Literal["left", "right"] = "left"
    """left keeps the end of the response (the part a reward model judges); right keeps the
    start."""
    chat_template: bool = False
    """Render chat messages with the tokenizer's chat template; otherwise as HH-RLHF text
    ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    normalization: Normalization | None = None
    """Reward mean/std; when absent they are read from the weights' config.json (mean, std),
    as OpenRLHF and `rewardserve train-rm` write them, else 0 and 1."""
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "float32"
    """auto: bfloat16 where it is the faster precision (a CUDA GPU that supports it, a CPU with
    AMX), else float32 (also on CPUs with AVX512-BF16 but no AMX, where bf16 measured slower).
    int8: torch dynamic quantization of the Linear layers (CPU, reward models only)."""
    trust_remote_code: bool = False
    default: bool = False
    """Serve this model when a request names none (one reward model, one policy)."""
    policy: PolicySpec | None = None
    """Policies only: how they generate (defaults apply when absent)."""
    ensemble: Ensemble | None = None
    """Reward models only: score with every member and report their mean and spread
    (`uncertainty`). The manifest's other settings (head, max_length, dtype, ...) apply to
    every member."""

    @field_validator("aliases")
    @classmethod
    def _distinct_aliases(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for i, alias in enumerate(v):
            if alias == info.data.get("name"):
                raise ValueError(f"alias {i} is the model's own name")
            if alias in v[:i]:
                raise ValueError(f"alias {i} ({alias!r}) is listed twice")
        return v

    @field_validator("composite")
    @classmethod
    def _composite_only_on_reward_models(
        cls, v: CompositeSpec | None, info: ValidationInfo
    ) -> CompositeSpec | None:
        if v is not None and info.data.get("kind") != "reward":
            raise ValueError("'composite' is for kind: reward only")
        return v

    @field_validator("source")
    @classmethod
    def _source_unless_composite(cls, v: Source | None, info: ValidationInfo) -> Source | None:
        if "composite" not in info.data:
            return v  # the composite section's own error is reported
        composite = info.data["composite"] is not None
        if v is None and not composite:
            raise ValueError("Field required (only a composite reward has no source)")
        if v is not None and composite:
            raise ValueError("a composite reward has no weights of its own: remove 'source'")
        return v

    @field_validator("policy")
    @classmethod
    def _policy_section_only_on_policies(
        cls, v: PolicySpec | None, info: ValidationInfo
    ) -> PolicySpec | None:
        if v is not None and info.data.get("kind") != "policy":
            raise ValueError("'policy' settings are for kind: policy only")
        return v

    @field_validator("ensemble")
    @classmethod
    def _ensemble_only_on_reward_models(
        cls, v: Ensemble | None, info: ValidationInfo
    ) -> Ensemble | None:
        if v is None:
            return v
        if info.data.get("kind") != "reward":
            raise ValueError("'ensemble' is for kind: reward only")
        if info.data.get("normalization") is not None:
            raise ValueError(
                "an ensemble's members each read their own mean/std from config.json; "
                "drop 'normalization'"
            )
        source = info.data.get("source")
        if source is not None and source.gguf_file:
            raise ValueError("ensemble members are model folders; drop 'source.gguf_file'")
        return v

    @field_validator("dtype")
    @classmethod
    def _int8_only_on_reward_models(cls, v: str, info: ValidationInfo) -> str:
        if v == "int8" and info.data.get("kind") == "policy":
            raise ValueError("int8 is for reward models; a policy takes auto, float32 or bfloat16")
        return v


def _describe(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    return field, first["msg"]


def load_manifest(folder: Path) -> ModelManifest:
    path = folder / MANIFEST_NAME
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ManifestError(path, "(file)", "missing") from None
    except yaml.YAMLError as e:
        raise ManifestError(path, "(file)", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(path, "(root)", "must be a mapping")
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(path, *_describe(e)) from None
    if manifest.name != folder.name:
        raise ManifestError(
            path, "name", f"'{manifest.name}' must match its folder '{folder.name}'"
        )
    return manifest


def _confined(base: Path, rel: str, path: Path, field: str) -> Path:
    base = base.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise ManifestError(path, field, f"'{rel}' leaves {base}")
    return target


def resolve_source(manifest: ModelManifest, model_folder: Path, cache_dir: Path) -> Path:
    """The folder holding the weights, confined to its base (symlinks resolved)."""
    src = manifest.source
    where = model_folder / MANIFEST_NAME
    if src is None:
        raise ManifestError(where, "source", "a composite reward has no weights of its own")
    if src.kind == "repository":
        base = model_folder
    elif src.kind == "cache":
        base = cache_dir
    else:
        spec = importlib.util.find_spec(src.package or "")
        if spec is None or not spec.submodule_search_locations:
            raise ManifestError(where, "source.package", f"package '{src.package}' not installed")
        base = Path(next(iter(spec.submodule_search_locations)))
    folder = _confined(base, src.path, where, "source.path")
    if src.gguf_file:
        _confined(folder, src.gguf_file, where, "source.gguf_file")
    return folder


def resolve_members(manifest: ModelManifest, model_folder: Path, cache_dir: Path) -> list[Path]:
    """The weight folders a reward model scores with: its source folder, or its ensemble's
    member folders inside it (confined like source.path)."""
    folder = resolve_source(manifest, model_folder, cache_dir)
    if manifest.ensemble is None:
        return [folder]
    where = model_folder / MANIFEST_NAME
    return [
        _confined(folder, rel, where, f"ensemble.members.{i}")
        for i, rel in enumerate(manifest.ensemble.members)
    ]
