"""Builds a RewardScorer from a manifest: weights, tokenizer, head, dtype, normalization."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.engine.scorer import Normalizer, RewardScorer
from rewardserve.loading import LOAD_LOCK
from rewardserve.modeling import ensure_pad_token
from rewardserve.registry.dtypes import resolve_dtype
from rewardserve.registry.manifest import ManifestError, ModelManifest, resolve_source

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
    where = model_folder / "model.yaml"
    if manifest.kind != "reward":
        raise ManifestError(where, "kind", "only reward models can be loaded for scoring")
    if manifest.trust_remote_code and not allow_trust_remote_code:
        raise ManifestError(
            where,
            "trust_remote_code",
            "the server does not allow remote code (--allow-trust-remote-code)",
        )
    folder = resolve_source(manifest, model_folder, cache_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"weights of '{manifest.name}' not found at {folder} (run `make models`?)"
        )
    with LOAD_LOCK:
        return _load(manifest, folder, where, allow_trust_remote_code)


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
