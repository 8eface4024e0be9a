"""Tiny real models for the PPO tests: a chat policy with an EOS and a small vocabulary (so a
few dozen CPU steps can move it), and a repository holding it beside a tiny reward model."""

from __future__ import annotations

from pathlib import Path

import torch

from builders import build_tiny_rm, llama3_tokenizer, write_manifest


def build_tiny_chat_policy(repo: Path, name: str = "tiny-chat", seed: int = 0) -> Path:
    """A random (seeded) 2-layer Llama causal LM on builders.llama3_tokenizer: about 400
    tokens, EOS <|eot_id|>, Llama-3's chat template."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder = repo / name
    weights = folder / "weights"
    tokenizer = llama3_tokenizer()
    tokenizer.pad_token = "<|end_of_text|>"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(weights)
    tokenizer.save_pretrained(weights)
    write_manifest(
        folder,
        name=name,
        kind="policy",
        source={"kind": "repository", "path": "weights"},
        max_length=256,
        default=True,
        policy={"backend": "transformers"},
    )
    return folder


def build_ppo_repository(root: Path) -> Path:
    """A model repository with the tiny chat policy and a tiny reward model, both default."""
    build_tiny_chat_policy(root)
    build_tiny_rm(root, "tiny-rm", default=True)
    return root


PROMPTS = [
    "Tell me a story.",
    "Is the sky blue?",
    "Hello!",
    "What does the fox do?",
    "Where is the cat?",
    "Say something nice.",
    "How are you today?",
    "Name a river.",
    "Why is the sky blue?",
    "Once upon a time",
]
