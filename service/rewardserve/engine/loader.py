"""Builds a RewardScorer from a manifest: weights, tokenizer, head, dtype, normalization."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.engine.scorer import Normalizer, RewardScorer
from rewardserve.loading import LOAD_LOCK
from rewardserve.modeling import ensure_pad_token
from rewardserve.registry.dtypes import resolve_dtype
from rewardserve.registry.manifest import (
    ManifestError,
    ModelManifest,
    resolve_members,
    resolve_source,
)

log = logging.getLogger(__name__)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _value_head(folder: Path, prefix: str, hidden: int, where: Path) -> torch.nn.Linear:
    key = f"{prefix}.weight"
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                weight = f.get_tensor(key)
                break
    else:
        raise ManifestError(where, "head.value_head_prefix", f"no tensor '{key}' in {folder}")
    head = torch.nn.Linear(hidden, 1, bias=False)
    head.weight.data.copy_(weight.reshape(1, hidden).float())
    return head


def load_reward_model(
    manifest: ModelManifest, model_folder: Path, cache_dir: Path, allow_trust_remote_code: bool
) -> RewardScorer:
    """A single reward model (an ensemble's members: load_reward_members)."""
    if manifest.ensemble is not None:
        where = model_folder / "model.yaml"
        raise ManifestError(where, "ensemble", "an ensemble loads with load_reward_members")
    (scorer,) = load_reward_members(manifest, model_folder, cache_dir, allow_trust_remote_code)
    return scorer


def load_reward_members(
    manifest: ModelManifest, model_folder: Path, cache_dir: Path, allow_trust_remote_code: bool
) -> list[RewardScorer]:
    """One scorer per member of an ensemble, in manifest order; one for a single model."""
    where = model_folder / "model.yaml"
    _check_loadable(manifest, where, allow_trust_remote_code)
    if manifest.ensemble is None:
        folders = [resolve_source(manifest, model_folder, cache_dir)]
        labels = [""]
    else:
        folders = resolve_members(manifest, model_folder, cache_dir)
        labels = [f"ensemble member '{m}' " for m in manifest.ensemble.members]
    for folder, label in zip(folders, labels, strict=True):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{label}weights of '{manifest.name}' not found at {folder} (run `make models`?)"
            )
    with LOAD_LOCK:
        scorers = [_load(manifest, f, where, allow_trust_remote_code) for f in folders]
    if manifest.chat_template and len({s.tokenizer.chat_template for s in scorers}) > 1:
        # render() writes one text per item for all members, with the first one's template
        raise ManifestError(
            where, "ensemble.members", "members with chat_template need the same chat template"
        )
    return scorers


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers encode every text alike (members trained from one backbone
    share one), so an ensemble's items can be tokenized once for all members."""
    if type(a) is not type(b) or a.special_tokens_map != b.special_tokens_map:
        return False
    if getattr(a, "is_fast", False):
        # the serialized fast tokenizer: vocabulary, normalizer, pre-tokenizer, post-processor
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    return a.get_vocab() == b.get_vocab() and a.init_kwargs == b.init_kwargs


def _check_loadable(manifest: ModelManifest, where: Path, allow_trust_remote_code: bool) -> None:
    if manifest.kind != "reward":
        raise ManifestError(where, "kind", "only reward models can be loaded for scoring")
    if manifest.trust_remote_code and not allow_trust_remote_code:
        raise ManifestError(
            where,
            "trust_remote_code",
            "the server does not allow remote code (--allow-trust-remote-code)",
        )


def _load(
    manifest: ModelManifest, folder: Path, where: Path, allow_trust_remote_code: bool
) -> RewardScorer:
    trust = manifest.trust_remote_code and allow_trust_remote_code
    kwargs: dict = {"trust_remote_code": trust}
    if manifest.source.gguf_file:
        kwargs["gguf_file"] = manifest.source.gguf_file

    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    tokenizer.truncation_side = manifest.truncation_side
    tokenizer.model_max_length = 10**9  # we truncate ourselves; silence the length warning
    ensure_pad_token(tokenizer)
    if manifest.chat_template and not tokenizer.chat_template:
        raise ManifestError(
            where, "chat_template", f"the tokenizer in {folder} has no chat template"
        )

    dtype_name = resolve_dtype(manifest.dtype)
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    config = _read_config(folder)
    value_head = None
    if manifest.head.format == "openrlhf":
        model = AutoModel.from_pretrained(folder, dtype=dtype, **kwargs)
        value_head = _value_head(
            folder, manifest.head.value_head_prefix, model.config.hidden_size, where
        ).to(dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=dtype, **kwargs
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if dtype_name == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    if manifest.normalization is not None:
        norm = Normalizer(manifest.normalization.mean, manifest.normalization.std)
    else:
        norm = Normalizer(float(config.get("mean", 0.0)), float(config.get("std", 1.0)) or 1.0)
    log.info(
        "loaded reward model %s from %s (%s, %s)",
        manifest.name,
        folder,
        manifest.head.format,
        dtype_name,
    )
    return RewardScorer(
        name=manifest.name,
        model=model,
        tokenizer=tokenizer,
        max_length=manifest.max_length,
        normalizer=norm,
        head=manifest.head.format,
        value_head=value_head,
        chat_template=manifest.chat_template,
    )
